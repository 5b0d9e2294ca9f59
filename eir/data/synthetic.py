"""A deterministic synthetic continual-segmentation dataset in PASCAL VOC layout.

It is the project's embedded default: the quick start and the tests run on it, so it has to
be learnable in minutes on a laptop CPU, yet hard enough that forgetting shows. Hence:

- 20 classes, each a distinct (hue, texture, shape) triple laid out as a Latin square: any
  *two* of the three attributes identify the class, no single one does (every hue, texture
  and shape is shared by four classes). A model must combine cues, and a single pixel's value
  never gives the class away (brightness jitter, dark texture shades, sensor noise).
- Several objects per image with random classes, so old classes appear, unlabelled, in the
  images of later steps -- the condition under which background shift and forgetting occur.
- Objects occlude each other (later ones are drawn on top; masks show what is visible) and
  the background is textured, neutral-coloured clutter rather than a flat colour.

Every image is rendered from its own seed (`seed`, image index), so image *i* is the same
whatever `num_images` is, and two runs with the same arguments write byte-identical files.
Pure numpy + PIL: it runs anywhere, including the Ray workers that prepare data.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from eir import storage
from eir.progress import progress as progress_bar

GENERATOR_VERSION = 1

# Attribute vocabularies. Hues are spread round the colour wheel so that they stay apart
# under the per-object hue jitter; backgrounds and distractors use unsaturated colours only.
_HUES: tuple[tuple[str, float], ...] = (
    ("red", 0.0),
    ("yellow", 55.0),
    ("green", 125.0),
    ("blue", 220.0),
    ("purple", 285.0),
)
_TEXTURES: tuple[str, ...] = ("flat", "striped", "checkered", "dotted", "speckled")
_SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross")

_HUE_JITTER_DEG = 5.0
_SATURATION_RANGE = (0.6, 0.95)
_BRIGHTNESS_RANGE = (0.55, 1.0)  # per-object brightness jitter (HSV value)
_DARK_SHADE = 0.4  # brightness factor of a texture's dark parts
_OBJECT_SCALE_RANGE = (0.15, 0.55)  # object diameter as a fraction of the image side
_DISTRACTORS_RANGE = (1, 4)  # unlabelled neutral blobs per image, inclusive
_DISTRACTOR_SCALE_RANGE = (0.1, 0.4)
_DISTRACTOR_CONTRAST = 0.5  # distractor textures are fainter, so objects stay the salient thing
_SENSOR_NOISE = 0.02  # std of per-pixel Gaussian noise on the [0, 1] image


@dataclass(frozen=True)
class SyntheticClass:
    """The look of one foreground class."""

    name: str
    hue: float  # degrees
    texture: str
    shape: str


def _class_specs() -> tuple[SyntheticClass, ...]:
    """Class k (1..20) = index i = k - 1 on a 5 x 4 Latin square over hue, shape and texture.

    hue = i % 5, row r = i // 5, shape = (hue + r) % 5, texture = (hue + 2r) % 5. For r in
    0..3 the differences shape - hue = r, texture - hue = 2r and texture - shape = r are all
    distinct mod 5, so every pair of attributes is unique to one class.
    """
    specs = []
    for i in range(20):
        hue, row = i % 5, i // 5
        shape = _SHAPES[(hue + row) % 5]
        texture = _TEXTURES[(hue + 2 * row) % 5]
        hue_name, hue_deg = _HUES[hue]
        specs.append(SyntheticClass(f"{hue_name}_{texture}_{shape}", hue_deg, texture, shape))
    return tuple(specs)


SYNTHETIC_CLASSES: tuple[SyntheticClass, ...] = _class_specs()
SYNTHETIC_CLASS_NAMES: tuple[str, ...] = ("background", *(c.name for c in SYNTHETIC_CLASSES))


@dataclass(frozen=True)
class SyntheticObject:
    """One pasted object: its class, its full (unoccluded) shape, and its id in the instance mask."""

    class_id: int
    mask: np.ndarray  # H x W bool, the whole shape before later objects cover it
    instance_id: int  # 1..N in the instance mask, 0 when later objects hide it entirely


@dataclass(frozen=True)
class SyntheticScene:
    """A rendered image with its class and instance masks (what the files hold) and its objects."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    label: np.ndarray  # H x W uint8 class ids 0..20
    instances: np.ndarray  # H x W uint8 instance ids 0..N, in drawing order
    objects: tuple[SyntheticObject, ...]  # in drawing order (later ones on top)


def _object_frame(size: int, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in an object's rotated frame, centred on the object.

    Textures are computed in this frame too, so stripes and checks turn with the shape.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """The shape inscribed in a circle of `radius` (pixels) around the frame's origin."""
    a, b = u / radius, v / radius
    if shape == "disc":
        return a * a + b * b <= 1.0
    if shape == "ring":
        r2 = a * a + b * b
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "square":
        return np.maximum(np.abs(a), np.abs(b)) <= 0.8
    if shape == "triangle":
        # Equilateral triangle with circumradius 1: three half-planes at inradius 0.5.
        inside = np.ones(a.shape, dtype=bool)
        for k in range(3):
            theta = np.pi / 2 + 2 * np.pi * k / 3
            inside &= a * np.cos(theta) + b * np.sin(theta) <= 0.5
        return inside
    if shape == "cross":
        arm = 0.33
        return ((np.abs(a) <= arm) & (np.abs(b) <= 0.95)) | ((np.abs(b) <= arm) & (np.abs(a) <= 0.95))
    raise ValueError(f"unknown shape {shape!r}; expected one of {_SHAPES}")


def _texture_shade(texture: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel brightness factor in [_DARK_SHADE, 1.1] that draws the texture in the object's frame."""
    phase_u, phase_v = rng.uniform(0.0, period, size=2)
    pu, pv = u + phase_u, v + phase_v
    half = period / 2
    dark = np.float32(_DARK_SHADE)
    if texture == "flat":
        return np.ones(u.shape, dtype=np.float32)
    if texture == "striped":
        return np.where(np.floor(pu / half) % 2 == 0, np.float32(1.0), dark)
    if texture == "checkered":
        return np.where((np.floor(pu / half) + np.floor(pv / half)) % 2 == 0, np.float32(1.0), dark)
    if texture == "dotted":
        du, dv = pu % period - half, pv % period - half
        return np.where(du * du + dv * dv <= (0.3 * period) ** 2, dark, np.float32(1.0))
    if texture == "speckled":
        return rng.uniform(_DARK_SHADE, 1.1, size=u.shape).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; expected one of {_TEXTURES}")


def _hsv_rgb(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, saturation, value), dtype=np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth, low-saturation noise: a random 6 x 6 colour field upsampled bilinearly."""
    grey = rng.uniform(0.3, 0.75)
    coarse = grey + rng.uniform(-0.15, 0.15, size=(6, 6, 1)) + rng.uniform(-0.05, 0.05, size=(6, 6, 3))
    coarse8 = (np.clip(coarse, 0.0, 1.0) * 255).round().astype(np.uint8)
    smooth = Image.fromarray(coarse8, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(smooth, dtype=np.float32) / 255.0


def _random_frame(
    size: int, scale_range: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float]:
    """A random position, rotation and radius; centres keep at least half of each radius inside."""
    diameter = rng.uniform(*scale_range) * size
    radius = diameter / 2
    cx, cy = rng.uniform(radius / 2, size - radius / 2, size=2)
    u, v = _object_frame(size, cx, cy, rng.uniform(0.0, 2 * np.pi))
    return u, v, radius


def _paint_distractors(canvas: np.ndarray, rng: np.random.Generator, period: float) -> None:
    """Unlabelled neutral blobs with any texture, so neither texture nor 'a blob' means foreground."""
    size = canvas.shape[0]
    for _ in range(rng.integers(_DISTRACTORS_RANGE[0], _DISTRACTORS_RANGE[1] + 1)):
        u, v, radius = _random_frame(size, _DISTRACTOR_SCALE_RANGE, rng)
        stretch = rng.uniform(0.5, 1.0)  # ellipses of any aspect ratio
        mask = _shape_mask("disc", u, v * np.float32(1.0 / stretch), radius)
        colour = _hsv_rgb(rng.uniform(0.0, 360.0), rng.uniform(0.0, 0.12), rng.uniform(0.3, 0.9))
        shade = _texture_shade(_TEXTURES[rng.integers(len(_TEXTURES))], u, v, period, rng)
        shade = 1.0 - _DISTRACTOR_CONTRAST * (1.0 - shade)
        canvas[mask] = shade[mask, None] * colour


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator that renders image `index`: one independent stream per image, so
    image i is the same whatever the number of images (and images could be made in parallel)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def render_scene(rng: np.random.Generator, image_size: int, max_objects: int) -> SyntheticScene:
    """Render one image: textured background, distractors, then 1..max_objects objects on top.

    Classes are drawn uniformly with replacement (so an image may hold two instances of a
    class); each later object overwrites the earlier ones, and the masks record what stays
    visible. Instance ids are renumbered 1..N over the visible objects in drawing order.
    """
    size = image_size
    period = max(4.0, size / 16)  # texture period in pixels: visible at any size we generate
    canvas = _background(size, rng)
    _paint_distractors(canvas, rng, period)

    label = np.zeros((size, size), dtype=np.uint8)
    drawn = np.zeros((size, size), dtype=np.uint8)  # 1-based drawing index
    placed: list[tuple[int, np.ndarray]] = []
    for index in range(1, rng.integers(1, max_objects + 1) + 1):
        class_id = int(rng.integers(1, len(SYNTHETIC_CLASSES) + 1))
        spec = SYNTHETIC_CLASSES[class_id - 1]
        u, v, radius = _random_frame(size, _OBJECT_SCALE_RANGE, rng)
        mask = _shape_mask(spec.shape, u, v, radius)
        colour = _hsv_rgb(
            spec.hue + rng.uniform(-_HUE_JITTER_DEG, _HUE_JITTER_DEG),
            rng.uniform(*_SATURATION_RANGE),
            rng.uniform(*_BRIGHTNESS_RANGE),
        )
        shade = _texture_shade(spec.texture, u, v, period, rng)
        canvas[mask] = shade[mask, None] * colour
        label[mask] = class_id
        drawn[mask] = index
        placed.append((class_id, mask))

    canvas += rng.normal(0.0, _SENSOR_NOISE, size=canvas.shape).astype(np.float32)
    image = (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8)

    instances = np.zeros((size, size), dtype=np.uint8)
    objects = []
    next_id = 1
    for index, (class_id, mask) in enumerate(placed, start=1):
        visible = drawn == index
        instance_id = 0
        if visible.any():
            instance_id = next_id
            instances[visible] = instance_id
            next_id += 1
        objects.append(SyntheticObject(class_id, mask, instance_id))
    return SyntheticScene(image, label, instances, tuple(objects))


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved class index), so masks look familiar in viewers."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = _voc_palette()


def _save_index_png(indices: np.ndarray, path: Path) -> None:
    im = Image.fromarray(indices, "L").convert("P")
    im.putpalette(_PALETTE)
    im.save(path, format="PNG")


def _split(num_images: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random train/val split; both parts non-empty when there are two or more images."""
    num_val = round(num_images * val_fraction)
    if val_fraction > 0 and num_images >= 2:
        num_val = min(max(num_val, 1), num_images - 1)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    order = rng.permutation(num_images)
    val = sorted(int(i) for i in order[:num_val])
    train = sorted(int(i) for i in order[num_val:])
    return train, val


def _sample_id(index: int) -> str:
    return f"syn_{index:06d}"


@dataclass(frozen=True)
class _Params:
    """What determines the dataset's bytes; recorded in SYNTHETIC.json to make reruns idempotent."""

    seed: int
    num_images: int
    image_size: int
    val_fraction: float
    max_objects: int

    def check(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images={self.num_images}: expected at least 1")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size}: expected at least 32 pixels (textures need room)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction}: expected 0 <= val_fraction < 1")
        if not 1 <= self.max_objects <= 254:
            raise ValueError(f"max_objects={self.max_objects}: expected 1..254 (instance ids are uint8, 255 = ignore)")

    def record(self) -> dict[str, object]:
        return {"generator": "eir.data.synthetic", "version": GENERATOR_VERSION, **asdict(self)}


def _write_dataset(root: Path, params: _Params, progress: bool) -> None:
    """Write every file of the dataset under `root` (a fresh directory)."""
    dirs = {name: root / name for name in ("JPEGImages", "SegmentationClass", "SegmentationObject")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    for index in progress_bar(range(params.num_images), "synthetic images", unit="img", enabled=progress):
        scene = render_scene(image_rng(params.seed, index), params.image_size, params.max_objects)
        name = f"{_sample_id(index)}.png"
        Image.fromarray(scene.image, "RGB").save(dirs["JPEGImages"] / name, format="PNG")
        _save_index_png(scene.label, dirs["SegmentationClass"] / name)
        _save_index_png(scene.instances, dirs["SegmentationObject"] / name)

    train, val = _split(params.num_images, params.val_fraction, params.seed)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, indices in (("train", train), ("val", val)):
        (sets / f"{split}.txt").write_text("".join(f"{_sample_id(i)}\n" for i in indices))
    (root / "class_names.txt").write_text("".join(f"{name}\n" for name in SYNTHETIC_CLASS_NAMES))
    (root / "SYNTHETIC.json").write_text(json.dumps(params.record(), indent=2, sort_keys=True) + "\n")


def _existing_params(out: Path) -> dict[str, object] | None:
    """The parameters recorded in an existing dataset, or None if it has no readable record."""
    try:
        return json.loads((out / "SYNTHETIC.json").read_text())
    except (OSError, ValueError):
        return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _check_matches(out: Path, params: _Params) -> None:
    existing = _existing_params(out)
    if existing != params.record():
        raise FileExistsError(
            f"{out} already exists and was not generated with these parameters "
            f"(found {existing if existing is not None else 'no readable SYNTHETIC.json'}, "
            f"expected {params.record()}); choose another output directory, delete it, or pass "
            "overwrite=True (`launch.py prepare synthetic --overwrite`)"
        )


def generate_synthetic(
    out: str | Path,
    num_images: int,
    *,
    seed: int = 0,
    image_size: int = 112,
    val_fraction: float = 0.2,
    max_objects: int = 4,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate the synthetic dataset into `out` (a VOC2012-like root) and return its path.

    Idempotent: if `out` already holds a dataset made with the same parameters it is returned
    untouched; anything else there raises FileExistsError unless `overwrite`, which replaces it.
    The data is written to a temporary sibling directory and renamed into place at the end, so
    a crash or a concurrent generator never leaves a half-written `out` behind.
    """
    params = _Params(int(seed), int(num_images), int(image_size), float(val_fraction), int(max_objects))
    params.check()
    out = Path(out)
    if out.exists() and not _is_empty_dir(out) and (not overwrite or _existing_params(out) == params.record()):
        _check_matches(out, params)  # raises unless the same dataset is there
        return out

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an earlier crashed run of a process with our pid
    try:
        _write_dataset(tmp, params, progress)
        if overwrite:
            storage.replace_dir(storage.resolve(tmp), storage.resolve(out))
        else:
            os.replace(tmp, out)
    except OSError:
        # Another process may have finished the same dataset first: accept it if it matches.
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists() and not _is_empty_dir(out):
            _check_matches(out, params)
            return out
        raise
    return out
