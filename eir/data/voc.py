"""PASCAL VOC 2012 in its VOCdevkit layout (also the synthetic generator's output).

`root` is the VOC2012 folder:
    JPEGImages/<id>.jpg          (or .png: the synthetic generator writes PNG images)
    SegmentationClass/<id>.png   palette PNGs whose indices are class ids 0..20 and 255
    SegmentationClassAug/<id>.png  the SBD-augmented labels (DeepLab's train_aug release)
    SegmentationObject/<id>.png  instance ids, optional
    ImageSets/Segmentation/<split>.txt  one id per line

VOC labels are already canonical (0 background, 1..20, 255 ignore), so they are only checked.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path, PurePosixPath

from eir.data.base import (
    DatasetError,
    DatasetInfo,
    Sample,
    SegmentationReader,
    check_label_range,
    check_same_size,
    decode_image,
    decode_index_png,
    read_file_bytes,
    read_text,
)

VOC_INFO = DatasetInfo(
    "voc",
    (
        "background",
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ),
    future_label=0,
)

CLASS_DIR = "SegmentationClass"
AUG_DIR = "SegmentationClassAug"
OBJECT_DIR = "SegmentationObject"
IMAGE_SUFFIXES = (".jpg", ".png")


class VOCReader(SegmentationReader):
    """One split of a VOCdevkit-style folder.

    `label_dir="auto"` follows the usual practice: train_aug is only labelled in
    SegmentationClassAug, and other splits prefer the official SegmentationClass masks,
    falling back to the Aug ones for ids the official set lacks. An explicit folder name
    forces that folder. `ids` replaces the split list (for folders without ImageSets).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        info: DatasetInfo = VOC_INFO,
        label_dir: str = "auto",
        ids: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.info = info
        self.label_dir = label_dir
        self._given_ids = list(ids) if ids is not None else None

    @property
    def split_file(self) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"

    @cached_property
    def _ids(self) -> list[str]:
        if self._given_ids is not None:
            return self._given_ids
        return read_id_list(self.split_file, "VOC split list (one image id per line)")

    def ids(self) -> list[str]:
        return list(self._ids)

    def read(self, sample_id: str) -> Sample:
        image_path = self._image_path(sample_id)
        image_bytes = read_file_bytes(image_path, "image")
        image, image_format = decode_image(image_bytes, image_path)

        label_path = self._label_path(sample_id)
        label = decode_index_png(read_file_bytes(label_path, "label"), label_path, "label")
        check_same_size(image, label, image_path, label_path)
        check_label_range(label, self.info.num_classes, label_path)

        instance_path = self.root / OBJECT_DIR / f"{sample_id}.png"
        instances = None
        if instance_path.is_file():
            instances = decode_index_png(read_file_bytes(instance_path, "instance map"), instance_path, "instance map")
            check_same_size(image, instances, image_path, instance_path)

        return Sample(sample_id, image, label, instances, image_bytes, image_format)

    def _image_path(self, sample_id: str) -> Path:
        candidates = [self.root / "JPEGImages" / f"{sample_id}{suffix}" for suffix in IMAGE_SUFFIXES]
        for path in candidates:
            if path.is_file():
                return path
        raise DatasetError(f"missing image for id {sample_id!r}: expected {candidates[0]} (or {candidates[1].name})")

    def _label_path(self, sample_id: str) -> Path:
        name = f"{sample_id}.png"
        if self.label_dir != "auto":
            return self.root / self.label_dir / name
        official = self.root / CLASS_DIR / name
        aug = self.root / AUG_DIR / name
        if self.split == "train_aug":
            return aug
        if official.is_file():
            return official
        if not aug.is_file():
            raise DatasetError(f"missing label for id {sample_id!r}: expected {official} (or {aug})")
        return aug


def read_id_list(path: Path, what: str) -> list[str]:
    """Ids of a split list, in file order (see `parse_id_lines` for what a line holds)."""
    ids = parse_id_lines(read_text(path, what, "one image id per line"), path)
    if not ids:
        raise DatasetError(f"{what} {path} is empty (expected at least one id)")
    return ids


def parse_id_lines(text: str, path: Path) -> list[str]:
    """The ids of a split list's text; blank lines are skipped.

    An id is the whole line without its surrounding whitespace (line ending, indentation,
    trailing blanks): spaces inside belong to it, as they do to the file names of users' own
    data (`IMG 0001.jpg` is id "IMG 0001"). A line naming paths (DeepLab-style
    "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png") gives its first file's stem; there
    spaces separate the paths, so a third field is an error rather than a guess. An id listed
    twice is an error too: it would be ingested, trained on and scored twice.
    """
    ids: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        sample_id = line
        if "/" in line:
            fields = line.split()
            if len(fields) > 2:
                raise DatasetError(
                    f"{path} line {number}: {line!r} has {len(fields)} fields; expected one id per line or "
                    "'<image path> <label path>' (spaces separate those paths: list such an id on its own)"
                )
            sample_id = PurePosixPath(fields[0]).stem
        if any(ord(char) < 32 for char in sample_id):
            raise DatasetError(f"{path} line {number}: {line!r} holds control characters (expected an image id)")
        if sample_id in ids:
            raise DatasetError(
                f"{path} line {number}: id {sample_id!r} is listed twice (first on line {ids[sample_id]})"
            )
        ids[sample_id] = number
    return list(ids)
