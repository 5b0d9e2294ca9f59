"""What every dataset reader yields, and the checks they share.

A reader turns one on-disk layout (VOC, ADE20K, CamVid, a generic folder, the synthetic
generator's output) into `Sample`s in the project's canonical label space: background 0,
classes 1..K, 255 = ignore. Everything downstream (ingest, tasks, training) only ever sees
that canonical space, so no other module knows which dataset it is looking at.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from eir.labels import IGNORE_LABEL

# Class ids 1..K and background 0 must stay below the ignore label in 8-bit label maps, and the
# model's channels 0..K too: K = 255 would make class 255 indistinguishable from "ignore".
MAX_CLASSES = IGNORE_LABEL - 1

# The most pixels (width x height) an image or label file may declare; larger ones are refused from
# their header, before a byte is decoded. Legitimate segmentation images are far smaller: PASCAL VOC
# is at most 500x500, Cityscapes 2048x1024 (2.1 MP), ADE20K's largest reach 2-3k px a side (< 10 MP);
# 50 MP also admits 48-MP phone photos (8000x6000). Decoding one is then at most 150 MB of RGB plus
# 50 MB of labels. A file above it is a decompression bomb (a 121-MP PNG fits in 480 KB and takes
# 2.4 GB and a minute to decode) or an image to downscale before ingest (`image_scale` resizes only
# after decoding). Pillow's own guard only warns below 179 MP.
MAX_IMAGE_PIXELS = 50_000_000

# What Pillow's decoders raise on corrupt or hostile files besides OSError: fuzzed files give these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file and what was expected."""


def shown(path: str | os.PathLike[str]) -> str:
    """A path for messages: bytes that are not UTF-8 (Linux allows them in names) shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_utf8_name(path: Path) -> None:
    """Ids are file names stored as text (Parquet strings, JSON splits), so a name must be UTF-8."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(
            f"file name {shown(path)} is not valid UTF-8 (expected UTF-8 file names: a file's name is its "
            "sample id, stored as text); rename the file"
        ) from None


def check_class_names(names: Sequence[str], source: str) -> None:
    """A label space eir can hold: background plus 1..MAX_CLASSES classes, every name once.

    Names key the per-class results (results.json, MLflow tables), so two classes of one name
    would silently share one entry.
    """
    if len(names) < 2:
        raise DatasetError(
            f"{source} has {len(names)} name(s); expected background first and at least one class after it"
        )
    if len(names) - 1 > MAX_CLASSES:
        raise DatasetError(
            f"{source} names {len(names) - 1} classes after background; at most {MAX_CLASSES} fit (class ids "
            f"1..{MAX_CLASSES} in 8-bit label maps, where 0 is background and {IGNORE_LABEL} means ignore)"
        )
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise DatasetError(
                f"{source}: class name {name!r} appears twice (ids {seen[name]} and {index}); expected unique names"
            )
        seen[name] = index


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset's canonical label space.

    `future_label` is what classes not yet seen become in *test* labels (METHOD.md §1:
    0 on VOC/CamVid/synthetic, 255 on ADE20K). `background_is_class` is False where
    label 0 carries no ground truth of its own (ADE20K with `dataset.ade_ignore_other`:
    raw 0 "other" mapped to ignore), so metrics can leave class 0 out of their means there.
    """

    name: str
    class_names: tuple[str, ...]  # index 0 = "background", then classes 1..K
    future_label: int = 0
    background_is_class: bool = True

    @property
    def num_classes(self) -> int:
        """K: the number of foreground classes (class ids 1..K)."""
        return len(self.class_names) - 1


@dataclass
class Sample:
    """One image with its canonical labels.

    `image_bytes` is the file exactly as read from disk, so ingest can store it without
    re-encoding (round trips are byte-identical and JPEGs lose nothing more).
    """

    id: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    label: np.ndarray  # H x W uint8: 0 background, 1..K classes, 255 ignore
    instances: np.ndarray | None  # H x W uint8 instance ids (0 none, 255 ignore), if the dataset has them
    image_bytes: bytes
    image_format: str  # "jpeg" | "png" | ...


class SegmentationReader(ABC):
    """A split of one dataset layout: a list of ids and a way to read each as a `Sample`."""

    info: DatasetInfo

    @abstractmethod
    def ids(self) -> list[str]:
        """The split's sample ids, in the split list's order."""

    @abstractmethod
    def read(self, sample_id: str) -> Sample:
        """Read and validate one sample."""

    def __len__(self) -> int:
        return len(self.ids())

    def __iter__(self) -> Iterator[Sample]:
        for sample_id in self.ids():
            yield self.read(sample_id)


def read_file_bytes(path: Path, what: str) -> bytes:
    """Read a file, or raise a DatasetError that says which file and what it should have been."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise DatasetError(
                f"missing {what}: {shown(path)} is a symbolic link to {shown(os.readlink(path))}, which does not exist"
            ) from None
        raise DatasetError(f"missing {what}: {shown(path)} does not exist") from None
    except OSError as exc:  # a folder, no permission, a symbolic link loop, an I/O error
        raise DatasetError(
            f"cannot read {what} {shown(path)}: {exc.strerror or exc} (expected a readable file)"
        ) from None
    except ValueError:  # a NUL byte, e.g. from a split list's line: no file can have that name
        raise DatasetError(f"cannot read {what} {shown(path)!r}: a file name cannot hold a NUL byte") from None


def read_text(path: Path, what: str, expected: str) -> str:
    """A text file decoded as UTF-8 (a byte-order mark is allowed); anything else names the first bad byte."""
    data = read_file_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{what} {shown(path)} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} "
            f"(expected {expected}, saved as UTF-8)"
        ) from None


@contextmanager
def _open_image(data: bytes, path: Path, what: str, expected: str) -> Iterator[Image.Image]:
    """Open encoded bytes (reading the header only) and refuse what declares more than MAX_IMAGE_PIXELS.

    Pillow's own warning for large images is silenced: the limit here is lower and says more.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit: it gives no size
        raise DatasetError(
            f"{what} {shown(path)} is refused before decoding: {exc} (eir decodes at most "
            f"{MAX_IMAGE_PIXELS:,} pixels, MAX_IMAGE_PIXELS in eir/data/base.py)"
        ) from None
    except UnidentifiedImageError:
        raise DatasetError(
            f"unreadable {what} {shown(path)}: not a format Pillow recognises, {len(data)} bytes (expected {expected})"
        ) from None
    except _DECODE_ERRORS as exc:
        raise DatasetError(
            f"unreadable {what} {shown(path)}: {exc or type(exc).__name__}, {len(data)} bytes (expected {expected})"
        ) from None
    with im:
        width, height = im.size
        if width * height > MAX_IMAGE_PIXELS:
            raise DatasetError(
                f"{what} {shown(path)} declares {width}x{height} = {width * height:,} pixels, more than eir's limit of "
                f"{MAX_IMAGE_PIXELS:,} (MAX_IMAGE_PIXELS in eir/data/base.py); refused before decoding: a "
                "decompression bomb, or an image to downscale before ingest"
            )
        try:
            yield im
        except DatasetError:
            raise
        except _DECODE_ERRORS as exc:
            raise DatasetError(
                f"unreadable {what} {shown(path)}: {exc or type(exc).__name__} (expected {expected})"
            ) from None


def decode_image(data: bytes, path: Path) -> tuple[np.ndarray, str]:
    """Decode encoded image bytes to H x W x 3 uint8 RGB; returns the array and the format."""
    with _open_image(data, path, "image", "a JPEG or PNG file") as im:
        fmt = (im.format or "unknown").lower()
        rgb = np.asarray(im.convert("RGB"))
    return rgb, fmt


def decode_index_png(data: bytes, path: Path, what: str) -> np.ndarray:
    """Decode a single-channel label/instance PNG (mode L or P) to H x W uint8 indices.

    Palette PNGs are read as their indices, never converted to colours: VOC masks store
    class ids as palette indices.
    """
    with _open_image(data, path, what, "a PNG file") as im:
        if im.mode not in ("L", "P"):
            raise DatasetError(
                f"{what} {shown(path)} has mode {im.mode!r}; expected a single-channel "
                "8-bit PNG (mode 'L' or palette 'P') holding class ids"
            )
        return np.array(im, dtype=np.uint8)


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    """Image and label must cover the same pixels."""
    if image.shape[:2] != label.shape[:2]:
        raise DatasetError(
            f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} but label "
            f"{label_path} is {label.shape[1]}x{label.shape[0]} (expected equal width x height)"
        )


def check_label_range(label: np.ndarray, num_classes: int, path: Path) -> None:
    """Canonical labels hold only 0..K and 255; anything else is a corrupt or foreign file."""
    values = np.unique(label)
    bad = values[(values > num_classes) & (values != IGNORE_LABEL)]
    if bad.size:
        raise DatasetError(
            f"label {path} holds values {bad.tolist()} outside the dataset's classes "
            f"(expected 0..{num_classes} or {IGNORE_LABEL})"
        )
