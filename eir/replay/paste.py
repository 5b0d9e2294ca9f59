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
Split in two where each half is cheapest. The choices (steps 2–4 and λ) need the crop's label and
pseudo-label maps, which only the data workers hold: `plan_paste` turns them into a paste plan of a
few numbers per instance (store row, channel, corner, cell side, λ). The pixels are the trainer's:
`apply_paste` blends the planned instances into the batch on its device and builds the compact
targets there — `paste_class` (255 = nothing pasted) and `paste_weight` (λ) per pixel, from which the
loss makes λ·onehot(paste) + (1 − λ)·onehot(label) (`eir.losses.soft_targets`). So the stream ships
72 bytes of plan per sample instead of two crop-sized maps (at a 512 crop, 786 KB), and no data
worker blends or resizes an instance (`launch.py bench pipeline`).

No Ray: the planning half is numpy + PIL and runs inside Ray Data CPU workers, whose arrays are
read-only views, so no input is modified in place; the applying half is torch on any device.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from eir.labels import IGNORE_LABEL, NO_PASTE
from eir.replay.instances import DecodedInstance

PLAN_COLUMNS = ("index", "channel", "y0", "x0", "side", "lambda")  # one row per planned instance
NO_INSTANCE = -1.0  # the `index` of a plan row that pastes nothing


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


def potential_classes(
    label: np.ndarray, pseudo: np.ndarray, k: int, label_channels: Collection[int] | None = None
) -> list[int]:
    """Channels the pseudo-labels show but the ground truth lacks: at most `k`, most pixels first.

    Ties go to the smaller channel, so the result does not depend on anything random.
    `label` is the step's ground truth *before* pseudo-labels are merged into it. Both maps are counted by
    PIL's C histogram (a third of `np.bincount`'s time, which widens every uint8 to int64 first, and one pass
    over the label instead of one comparison per channel found). `label_channels`, when given, are all the
    channels `label` can hold (the values of its look-up table: a crop or flip only moves pixels); when none
    of the pseudo-labels' channels is among them the label is not counted at all. That is every image of a
    step's own data — its look-up table sends every old class to 0 (background shift), and pseudo-labels
    hold old channels only — and it saves a third of this function's time (~0.03 ms of a data worker's
    ~2.2 ms per image on CamVid).
    """
    for name, values in (("label", label), ("pseudo", pseudo)):
        if values.dtype != np.uint8 or values.ndim != 2:
            raise ValueError(f"potential_classes: {name} must be an H x W uint8 map, got {values.dtype} {values.shape}")
    counts = Image.fromarray(pseudo).histogram()
    channels = [c for c in range(1, IGNORE_LABEL) if counts[c]]  # neither background nor ignore
    if label_channels is None or any(c in label_channels for c in channels):
        in_label = Image.fromarray(label).histogram()
        channels = [c for c in channels if in_label[c] == 0]
    return sorted(channels, key=lambda c: (-counts[c], c))[:k]  # most pixels first, then the smaller channel


def rank_cells(label: np.ndarray, pseudo: np.ndarray, grid: int = 2) -> list[tuple[int, int, int, int]]:
    """The grid x grid cells (y0, x0, y1, x1) of the crop, most background pixels first.

    Background means label 0 and no pseudo-label: the free space where a pasted object hides
    the least ground truth. Ties keep row-major order (stable sort).
    """
    height, width = label.shape
    ys = [round(i * height / grid) for i in range(grid + 1)]
    xs = [round(i * width / grid) for i in range(grid + 1)]
    free = (label | pseudo) == 0  # both uint8: zero exactly where both are
    cells = [(ys[r], xs[c], ys[r + 1], xs[c + 1]) for r in range(grid) for c in range(grid)]
    counts = [np.count_nonzero(free[y0:y1, x0:x1]) for y0, x0, y1, x1 in cells]  # a third of bool .sum()'s time
    order = sorted(range(len(cells)), key=lambda i: -counts[i])
    return [cells[i] for i in order]


def _choose_channels(
    label: np.ndarray,
    pseudo: np.ndarray,
    available: set[int],
    old_channels: Sequence[int],
    config: PasteConfig,
    rng: np.random.Generator,
    label_channels: Collection[int] | None,
) -> list[int]:
    """Step 2 + the fill rule of step 4.

    Potential classes without stored instances are dropped *before* keeping the top
    `max_instances`, so an old class that never formed a storable instance does not take a
    slot a replayable one could use.
    """
    ranked = potential_classes(label, pseudo, k=256, label_channels=label_channels)
    chosen = [c for c in ranked if c in available][: config.max_instances]
    if len(chosen) < config.min_classes:
        extra = sorted({int(c) for c in old_channels if int(c) in available and int(c) not in chosen})
        for c in rng.permutation(extra)[: config.max_instances - len(chosen)] if extra else []:
            chosen.append(int(c))
    return chosen


def plan_rows(config: PasteConfig) -> int:
    """Rows of every paste plan under `config`: one per possible instance (at least one, so a stream
    column of plans never has an empty axis)."""
    return max(1, config.max_instances)


def empty_plan(config: PasteConfig) -> np.ndarray:
    """A plan that pastes nothing (the image was not drawn for pasting, or is an instance-replay sample)."""
    plan = np.zeros((plan_rows(config), len(PLAN_COLUMNS)), dtype=np.float32)
    plan[:, 0] = NO_INSTANCE
    return plan


def plan_paste(
    label: np.ndarray,
    pseudo: np.ndarray,
    store_index_by_channel: dict[int, np.ndarray],
    old_channels: Sequence[int],
    config: PasteConfig,
    rng: np.random.Generator,
    label_channels: Collection[int] | None = None,
) -> np.ndarray:
    """What to paste into one crop (METHOD.md §3.3 steps 2–5 without the pixels); the inputs are not modified.

    label: H x W uint8 step-t channels (255 ignore), without the pseudo-labels; pseudo: H x W uint8 old
    channels (0 = none). `store_index_by_channel` maps a channel to store rows (see `index_by_channel`).
    `label_channels`: the channels `label` can hold at all, when the caller knows them (`potential_classes`).
    Returns a `plan_rows(config)` x 6 float32 plan (`PLAN_COLUMNS`): per instance its store row, channel,
    the top-left corner of its cell, the cell side it is scaled to and λ (1 for a hard paste); rows after the
    last instance hold index `NO_INSTANCE`. The instances of one image take different cells, so they never
    overlap. Every value is an integer below 2^24 or λ, so float32 holds them exactly.
    """
    if pseudo.shape != label.shape or label.ndim != 2:
        raise ValueError(f"paste: label {label.shape}, pseudo {pseudo.shape}; expected two H x W maps")
    plan = empty_plan(config)
    if rng.random() >= config.probability:
        return plan
    available = {int(c) for c, rows in store_index_by_channel.items() if len(rows)}
    channels = _choose_channels(label, pseudo, available, old_channels, config, rng, label_channels)
    cells = rank_cells(label, pseudo, config.grid)
    for row, (channel, (y0, x0, y1, x1)) in enumerate(zip(channels, cells)):
        rows = store_index_by_channel[channel]
        index = int(rows[rng.integers(len(rows))])  # rng.choice(rows)'s draw, without its ~5 µs of checks
        lam = 1.0 if config.hard else float(rng.uniform(0.0, 1.0))
        plan[row] = (index, channel, y0, x0, min(y1 - y0, x1 - x0), lam)
    return plan


def _scaled(crop: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longer side equals `side`, keeping the aspect ratio (bilinear / nearest)."""
    height, width = mask.shape
    factor = side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    crop_out = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BILINEAR))
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
    mask_out = np.asarray(mask_img.resize(size, Image.NEAREST)) > 127
    return crop_out, mask_out


class ScaledInstances:
    """The store's instances on the trainer's device, each resized to a cell side once per step.

    With a fixed crop the cells never change size, so an instance is resized (on the CPU, by PIL, the
    resampling the store's crops were made with) the first time a plan asks for it at that side and kept
    on the device as 3 x h x w uint8 pixels and an h x w mask: a few hundred instances at most per step.
    """

    def __init__(self, arrays: Sequence[DecodedInstance], device: torch.device | str = "cpu"):
        self.arrays, self.device = arrays, torch.device(device)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.arrays)

    def __call__(self, index: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self.arrays):
            raise ValueError(f"paste plan: store row {index}, but the instance store holds {len(self.arrays)} rows")
        if (index, side) not in self._cache:
            _, crop, mask = self.arrays[index]
            pixels, inside = _scaled(crop, mask, side)
            self._cache[index, side] = (
                torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(self.device),
                torch.from_numpy(inside).to(self.device),
            )
        return self._cache[index, side]


def apply_paste(
    images: torch.Tensor, plans: torch.Tensor | np.ndarray, instances: ScaledInstances
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry out a batch of paste plans on the images' device; `images` is not modified.

    images: B x 3 x H x W uint8; plans: B x rows x 6 (`plan_paste`). Each instance lands at its cell's
    top-left corner (clipped to the crop) and is blended inside its mask as region + λ·(instance − region)
    in float32, rounded half to even — the arithmetic of METHOD.md §3.3 step 5, exact on uint8 pixels.
    Returns (images, paste_class B x H x W uint8 with 255 = no paste, paste_weight B x H x W float16 = λ
    where pasted and 0 elsewhere). The plans are read on the host (a few numbers per image).
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"paste: images {tuple(images.shape)} {images.dtype}; expected B x 3 x H x W uint8")
    rows = plans.detach().cpu().numpy() if isinstance(plans, torch.Tensor) else np.asarray(plans)
    if rows.ndim != 3 or rows.shape[0] != images.shape[0] or rows.shape[2] != len(PLAN_COLUMNS):
        raise ValueError(
            f"paste: plans of shape {rows.shape} for {images.shape[0]} images; expected "
            f"{images.shape[0]} x rows x {len(PLAN_COLUMNS)} ({', '.join(PLAN_COLUMNS)})"
        )
    batch, _, height, width = images.shape
    out = images.clone()
    paste_class = torch.full((batch, height, width), NO_PASTE, dtype=torch.uint8, device=images.device)
    paste_weight = torch.zeros((batch, height, width), dtype=torch.float16, device=images.device)
    for image, row in zip(*np.nonzero(rows[:, :, 0] != NO_INSTANCE)):
        index, channel, y0, x0, side = (int(v) for v in rows[image, row, :5])
        lam = float(rows[image, row, 5])
        pixels, mask = instances(index, side)
        y1, x1 = min(y0 + mask.shape[0], height), min(x0 + mask.shape[1], width)
        inside = mask[: y1 - y0, : x1 - x0]
        region = out[image, :, y0:y1, x0:x1]
        base = region.float()
        blended = pixels[:, : y1 - y0, : x1 - x0].float()
        blended -= base
        blended *= lam
        blended += base
        region.copy_(torch.where(inside, blended.round_(), base).to(torch.uint8))
        paste_class[image, y0:y1, x0:x1].masked_fill_(inside, channel)
        paste_weight[image, y0:y1, x0:x1].masked_fill_(inside, lam)
    return out, paste_class, paste_weight
