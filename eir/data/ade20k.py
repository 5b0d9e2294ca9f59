"""ADE20K SceneParsing in its ADEChallengeData2016 layout.

    images/{training,validation}/<id>.jpg
    annotations/{training,validation}/<id>.png   8-bit grey, 0 = "other", 1..150 = classes

Raw 0 ("other") carries no class, so it becomes ignore (255); 1..150 are already canonical.
There is no background class: label 0 never occurs in canonical ADE labels until the task
masking turns unseen classes into it.
"""

from __future__ import annotations

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

ADE20K_INFO = DatasetInfo(
    "ade20k",
    ("background", *ADE20K_CLASSES),
    future_label=IGNORE_LABEL,
    background_is_class=False,
)

SPLIT_FOLDERS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

# Raw 0 ("other") -> ignore; 1..150 unchanged; 255 (already ignore in some exports) stays ignore.
_RAW_TO_CANONICAL = np.arange(256, dtype=np.uint8)
_RAW_TO_CANONICAL[0] = IGNORE_LABEL


class ADE20KReader(SegmentationReader):
    """One split ("train"/"training" or "val"/"validation") of ADEChallengeData2016."""

    info = ADE20K_INFO

    def __init__(self, root: str | Path, split: str) -> None:
        if split not in SPLIT_FOLDERS:
            raise DatasetError(f"unknown ADE20K split {split!r}; expected one of {sorted(SPLIT_FOLDERS)}")
        self.root = Path(root)
        self.split = split
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
        label = _RAW_TO_CANONICAL[raw]
        return Sample(sample_id, image, label, None, image_bytes, image_format)
