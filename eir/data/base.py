"""What every dataset reader yields, and the checks they share.

A reader turns one on-disk layout (VOC, ADE20K, CamVid, a generic folder, the synthetic
generator's output) into `Sample`s in the project's canonical label space: background 0,
classes 1..K, 255 = ignore. Everything downstream (ingest, tasks, training) only ever sees
that canonical space, so no other module knows which dataset it is looking at.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE_LABEL = 255


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file and what was expected."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset's canonical label space.

    `future_label` is what classes not yet seen become in *test* labels (METHOD.md §1:
    0 on VOC/CamVid/synthetic, 255 on ADE20K). `background_is_class` is False where
    label 0 carries no ground truth of its own (ADE20K: raw 0 is "other", mapped to
    ignore), so metrics can leave class 0 out of their means there.
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
    if not path.is_file():
        raise DatasetError(f"missing {what}: {path} does not exist")
    return path.read_bytes()


def decode_image(data: bytes, path: Path) -> tuple[np.ndarray, str]:
    """Decode encoded image bytes to H x W x 3 uint8 RGB; returns the array and the format."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "unknown").lower()
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError as exc:
        raise DatasetError(f"unreadable image {path}: not a format Pillow recognises, {len(data)} bytes "
                           "(expected a JPEG or PNG file)") from exc
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"unreadable image {path}: {exc} (expected a JPEG or PNG file)") from exc
    return rgb, fmt


def decode_index_png(data: bytes, path: Path, what: str) -> np.ndarray:
    """Decode a single-channel label/instance PNG (mode L or P) to H x W uint8 indices.

    Palette PNGs are read as their indices, never converted to colours: VOC masks store
    class ids as palette indices.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P"):
                raise DatasetError(
                    f"{what} {path} has mode {im.mode!r}; expected a single-channel "
                    "8-bit PNG (mode 'L' or palette 'P') holding class ids"
                )
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"unreadable {what} {path}: {exc} (expected a PNG file)") from exc


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
