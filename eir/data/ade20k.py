"""ADE20K SceneParsing in its ADEChallengeData2016 layout.

    images/{training,validation}/<id>.jpg
    annotations/{training,validation}/<id>.png   8-bit grey, 0 = "other", 1..150 = classes

1..150 are already canonical. What raw 0 ("other": every pixel outside the 150 classes) becomes is
a convention the papers disagree on (METHOD.md §1.1), chosen by `dataset.ade_ignore_other`:

- false (the default; DKD's released ADE loader, which EIR forks): raw 0 stays 0, the background
  class: trained as channel 0 and scored among the old classes.
- true (MiB, PLOP): raw 0 becomes ignore (255) and no label is 0 until the task masking turns
  unseen classes into it, so class 0 is scored nowhere (`background_is_class=False`).

The choice is made here, at ingest: the two conventions are different prepared datasets (their
labels and label spaces differ, hence their content checksums), keyed apart in the ingest cache.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path

import numpy as np

from eir.data.base import (
    IGNORE_LABEL,
    DatasetError,
    DatasetInfo,
    Sample,
    SegmentationReader,
    check_label_range,
    check_same_size,
    check_utf8_name,
    decode_image,
    decode_index_png,
    read_file_bytes,
)

# objectInfo150 order (first WordNet name of each entry); index 0 is the canonical background slot.
ADE20K_CLASSES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

# Future classes become ignore in test labels under both conventions: DKD's ADE config tests with
# masking_value 255, and raw 0 is not a future class (it stays 0 under DKD's, is 255 under MiB's).
ADE20K_INFO = DatasetInfo("ade20k", ("background", *ADE20K_CLASSES), future_label=IGNORE_LABEL)
ADE20K_INFO_IGNORE_OTHER = dataclasses.replace(ADE20K_INFO, background_is_class=False)

SPLIT_FOLDERS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def ade20k_info(ignore_other: bool) -> DatasetInfo:
    """The label space under one convention for raw 0 (`dataset.ade_ignore_other`)."""
    return ADE20K_INFO_IGNORE_OTHER if ignore_other else ADE20K_INFO


def _raw_to_canonical(ignore_other: bool) -> np.ndarray:
    """Raw -> canonical LUT: 1..150 and 255 (already ignore in some exports) unchanged; raw 0 -> 255 or kept."""
    lut = np.arange(256, dtype=np.uint8)
    if ignore_other:
        lut[0] = IGNORE_LABEL
    return lut


class ADE20KReader(SegmentationReader):
    """One split ("train"/"training" or "val"/"validation") of ADEChallengeData2016.

    `ignore_other`: raw 0 becomes 255 (MiB's convention) instead of background 0 (DKD's).
    """

    def __init__(self, root: str | Path, split: str, *, ignore_other: bool = False) -> None:
        if split not in SPLIT_FOLDERS:
            raise DatasetError(f"unknown ADE20K split {split!r}; expected one of {sorted(SPLIT_FOLDERS)}")
        self.root = Path(root)
        self.split = split
        self.info = ade20k_info(ignore_other)
        self._lut = _raw_to_canonical(ignore_other)
        folder = SPLIT_FOLDERS[split]
        self.image_dir = self.root / "images" / folder
        self.label_dir = self.root / "annotations" / folder

    @cached_property
    def _ids(self) -> list[str]:
        if not self.image_dir.is_dir():
            raise DatasetError(f"missing ADE20K image folder {self.image_dir} (expected <id>.jpg files)")
        paths = sorted(self.image_dir.glob("*.jpg"))
        for path in paths:
            check_utf8_name(path)
        ids = [path.stem for path in paths]
        if not ids:
            raise DatasetError(f"ADE20K image folder {self.image_dir} holds no .jpg files")
        return ids

    def ids(self) -> list[str]:
        return list(self._ids)

    def read(self, sample_id: str) -> Sample:
        image_path = self.image_dir / f"{sample_id}.jpg"
        image_bytes = read_file_bytes(image_path, "image")
        image, image_format = decode_image(image_bytes, image_path)

        label_path = self.label_dir / f"{sample_id}.png"
        raw = decode_index_png(read_file_bytes(label_path, "annotation"), label_path, "annotation")
        check_same_size(image, raw, image_path, label_path)
        check_label_range(raw, self.info.num_classes, label_path)
        label = self._lut[raw]
        return Sample(sample_id, image, label, None, image_bytes, image_format)
