"""EIR's per-image composition: paste stored old-class instances into a new training crop.

METHOD.md §3.3 steps 2–5, on one already-augmented crop, in the model's *channel* space:
    2. potential classes = old channels the pseudo-labels show but the ground truth lacks,
       the `max_instances` with the most pixels;
    3. split the crop into a grid x grid of cells, ranked by background pixels
       (label 0 and no pseudo-label);
    4. one random stored instance per chosen channel; with fewer than `min_classes` potential
       classes, random old channels are added until there are `max_instances`;
    5. scale each instance so its longer side equals the cell side, put it at the top-left of
       the next best cell and blend it inside its mask with λ ~ U(0, 1).
The targets stay compact: `paste_class` (255 = nothing pasted) and `paste_weight` (λ) per
pixel; the label map is returned untouched and the trainer builds
λ·onehot(paste) + (1 − λ)·onehot(label) (`eir.losses.soft_targets`).

Pure numpy + PIL, no Ray and no torch: it runs inside Ray Data CPU workers, whose arrays
are read-only views, so no input is ever modified in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from eir.labels import IGNORE_LABEL, NO_PASTE
from eir.replay.instances import DecodedInstance


@dataclass(frozen=True)
class PasteConfig:
    """The knobs of §3.3; defaults are the paper's."""

    max_instances: int = 3  # potential classes kept, and the count filled up to
    min_classes: int = 2  # below this many potential classes, random old classes are added
    hard: bool = False  # λ = 1 (replace) instead of λ ~ U(0, 1) (blend)
    probability: float = 1.0  # chance that an image gets pasted at all
    grid: int = 2  # cells per side

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise ValueError(f"paste grid={self.grid}: expected at least 1 cell per side")
        if not 0 <= self.max_instances <= self.grid * self.grid:
            raise ValueError(
                f"paste max_instances={self.max_instances}: expected 0..{self.grid * self.grid} "
                f"(one instance per cell of the {self.grid}x{self.grid} grid)"
            )
        if not 0 <= self.min_classes <= self.max_instances:
            raise ValueError(f"paste min_classes={self.min_classes}: expected 0..max_instances ({self.max_instances})")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"paste probability={self.probability}: expected a value in [0, 1]")


def index_by_channel(class_ids: np.ndarray, class_to_channel: np.ndarray) -> dict[int, np.ndarray]:
    """Store row indices per model channel, through the step's class → channel LUT.

    Stored instances hold canonical class ids; the model's channels follow the task's class
    order. Classes that map to background (0) or ignore (255) are never pasted.
    """
    if class_to_channel.shape != (256,):
        raise ValueError(f"class_to_channel must be a 256-entry LUT, got shape {class_to_channel.shape}")
    channels = class_to_channel[np.asarray(class_ids, dtype=np.int64)]
    return {int(c): np.flatnonzero(channels == c) for c in np.unique(channels) if c not in (0, IGNORE_LABEL)}


def potential_classes(label: np.ndarray, pseudo: np.ndarray, k: int) -> list[int]:
    """Channels the pseudo-labels show but the ground truth lacks: at most `k`, most pixels first.

    Ties go to the smaller channel, so the result does not depend on anything random.
    `label` is the step's ground truth *before* pseudo-labels are merged into it. The pseudo map is
    counted by PIL's C histogram (a third of `np.bincount`'s time, which widens every uint8 to int64
    first); the few channels found are then looked up in the label one by one.
    """
    if pseudo.dtype != np.uint8 or pseudo.ndim != 2:
        raise ValueError(f"potential_classes: pseudo must be an H x W uint8 map, got {pseudo.dtype} {pseudo.shape}")
    counts = np.asarray(Image.fromarray(pseudo).histogram())
    counts[[0, IGNORE_LABEL]] = 0
    channels = [int(c) for c in np.flatnonzero(counts) if not (label == c).any()]
    return sorted(channels, key=lambda c: (-counts[c], c))[:k]  # most pixels first, then the smaller channel


def rank_cells(label: np.ndarray, pseudo: np.ndarray, grid: int = 2) -> list[tuple[int, int, int, int]]:
    """The grid x grid cells (y0, x0, y1, x1) of the crop, most background pixels first.

    Background means label 0 and no pseudo-label: the free space where a pasted object hides
    the least ground truth. Ties keep row-major order (stable sort).
    """
    height, width = label.shape
    ys = [round(i * height / grid) for i in range(grid + 1)]
    xs = [round(i * width / grid) for i in range(grid + 1)]
    free = (label == 0) & (pseudo == 0)
    cells = [(ys[r], xs[c], ys[r + 1], xs[c + 1]) for r in range(grid) for c in range(grid)]
    counts = [int(free[y0:y1, x0:x1].sum()) for y0, x0, y1, x1 in cells]
    order = sorted(range(len(cells)), key=lambda i: -counts[i])
    return [cells[i] for i in order]


def _choose_channels(
    label: np.ndarray,
    pseudo: np.ndarray,
    available: set[int],
    old_channels: Sequence[int],
    config: PasteConfig,
    rng: np.random.Generator,
) -> list[int]:
    """Step 2 + the fill rule of step 4.

    Potential classes without stored instances are dropped *before* keeping the top
    `max_instances`, so an old class that never formed a storable instance does not take a
    slot a replayable one could use.
    """
    ranked = potential_classes(label, pseudo, k=256)
    chosen = [c for c in ranked if c in available][: config.max_instances]
    if len(chosen) < config.min_classes:
        extra = sorted({int(c) for c in old_channels if int(c) in available and int(c) not in chosen})
        for c in rng.permutation(extra)[: config.max_instances - len(chosen)] if extra else []:
            chosen.append(int(c))
    return chosen


def _scaled(crop: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longer side equals `side`, keeping the aspect ratio (bilinear / nearest).

    Kept as uint8, not as the float32 `_blend` computes in: a worker caches every instance at its cell
    size, and at a 512 crop a float32 instance is 0.8 MB (converting per paste costs ~10 µs).
    """
    height, width = mask.shape
    factor = side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    crop_out = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BILINEAR))
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
    mask_out = np.asarray(mask_img.resize(size, Image.NEAREST)) > 127
    return crop_out, mask_out


def _blend(region: np.ndarray, instance: np.ndarray, inside: np.ndarray, lam: float) -> None:
    """region = λ·instance + (1 − λ)·region inside the mask, rounded, in place on the output copy.

    `region` and `instance` are h x w x 3 uint8 (`region` possibly a strided view: a channels-first
    image seen as HWC). Computed as region + λ·(instance − region) over the whole box in one float32
    buffer, updated in place, and copied back where the mask is set: a third of the cost of boolean
    indexing on float64 pixels. No clip is needed: a convex blend of two uint8 values stays in 0..255.
    """
    base = region.astype(np.float32)
    blended = instance.astype(np.float32)
    blended -= base
    blended *= np.float32(lam)
    blended += base
    np.rint(blended, out=blended)
    np.copyto(region, blended, where=inside[..., None], casting="unsafe")


def paste_instances(
    image: np.ndarray,
    label: np.ndarray,
    pseudo: np.ndarray,
    store_arrays: Sequence[DecodedInstance],
    store_index_by_channel: dict[int, np.ndarray],
    old_channels: Sequence[int],
    config: PasteConfig,
    rng: np.random.Generator,
    scaled_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None,
    channels_first: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Paste stored instances into one crop (METHOD.md §3.3); the inputs are not modified.

    image: H x W x 3 uint8 (3 x H x W with `channels_first`, the layout the training stream
    crops in: pasting through a strided HWC view of it spares two full-image transposes);
    label: H x W uint8 step-t channels (255 ignore), without the pseudo-labels;
    pseudo: H x W uint8 old channels (0 = none). `store_index_by_channel` maps a channel to
    rows of `store_arrays` (see `index_by_channel`).
    Returns (image, paste_class uint8 with 255 = no paste, paste_weight float16 = λ where
    pasted and 0 elsewhere, one dict per paste: channel, index, cell, bbox, lambda).
    The instances of one image land in different cells and never overlap; were they to,
    the later one would win in both maps. `scaled_cache` keeps each instance resized to a cell
    side across calls: with a fixed crop the cells never change size, so a data worker resizes
    an instance once per step instead of once per paste (resizing was half of the paste's cost).
    """
    hwc_shape = image.shape[1:] + image.shape[:1] if channels_first and image.ndim == 3 else image.shape
    if len(hwc_shape) != 3 or hwc_shape[2] != 3 or hwc_shape[:2] != label.shape or pseudo.shape != label.shape:
        layout = "3 x H x W" if channels_first else "H x W x 3"
        raise ValueError(
            f"paste: image {image.shape}, label {label.shape}, pseudo {pseudo.shape}; "
            f"expected {layout} and two H x W maps"
        )
    out = image.copy()
    pixels = out.transpose(1, 2, 0) if channels_first else out  # an HWC view of the output
    paste_class = np.full(label.shape, NO_PASTE, dtype=np.uint8)
    paste_weight = np.zeros(label.shape, dtype=np.float16)
    pasted: list[dict[str, Any]] = []
    if rng.random() >= config.probability:
        return out, paste_class, paste_weight, pasted

    available = {int(c) for c, rows in store_index_by_channel.items() if len(rows)}
    channels = _choose_channels(label, pseudo, available, old_channels, config, rng)
    cells = rank_cells(label, pseudo, config.grid)
    for channel, cell in zip(channels, cells):
        index = int(rng.choice(store_index_by_channel[channel]))
        cy0, cx0, cy1, cx1 = cell
        side = min(cy1 - cy0, cx1 - cx0)
        if scaled_cache is not None and (index, side) in scaled_cache:
            inst, inst_mask = scaled_cache[index, side]
        else:
            _, crop, mask = store_arrays[index]
            inst, inst_mask = _scaled(crop, mask, side)
            if scaled_cache is not None:
                scaled_cache[index, side] = (inst, inst_mask)
        y1, x1 = min(cy0 + inst_mask.shape[0], label.shape[0]), min(cx0 + inst_mask.shape[1], label.shape[1])
        inside = inst_mask[: y1 - cy0, : x1 - cx0]
        lam = 1.0 if config.hard else float(rng.uniform(0.0, 1.0))
        _blend(pixels[cy0:y1, cx0:x1], inst[: y1 - cy0, : x1 - cx0], inside, lam)
        np.copyto(paste_class[cy0:y1, cx0:x1], np.uint8(channel), where=inside)
        paste_weight[cy0:y1, cx0:x1][inside] = lam
        pasted.append({"channel": channel, "index": index, "cell": cell, "bbox": (cy0, cx0, y1, x1), "lambda": lam})
    return out, paste_class, paste_weight, pasted
