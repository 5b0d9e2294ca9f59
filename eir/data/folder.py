"""A generic layout for users' own data, and the class-name file it shares with the synthetic set.

    root/class_names.txt   one unique name per line; line 0 is background, so K = lines - 1 (K <= 254)
    root/images/<id>.jpg|.png
    root/masks/<id>.png    8-bit class ids 0..K, 255 = ignore
    root/<split>.txt       the split's ids, one per line (a whole line is one id, spaces included)

Text files are UTF-8 (a byte-order mark is fine) and image file names too: a name is its id.

Split lists are optional as a whole: a folder without any `*.txt` list (besides the class
names) uses every image for every split, with a warning, since train and test then coincide.
Once lists exist, a split without one is an error: falling back to every image would let a
typo'd test split (`vall`) score the model on its own training images.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

from eir.data.base import (
    DatasetError,
    DatasetInfo,
    Sample,
    SegmentationReader,
    check_class_names,
    check_label_range,
    check_same_size,
    check_utf8_name,
    decode_image,
    decode_index_png,
    read_file_bytes,
    read_text,
)
from eir.data.voc import parse_id_lines, read_id_list

CLASS_NAMES_FILE = "class_names.txt"
IMAGE_SUFFIXES = (".jpg", ".png")


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from a one-per-line file; line 0 is background and at least one class follows."""
    text = read_text(path, "class name list", "one class name per line, background first")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    check_class_names(names, f"class name list {path}")
    return names


def info_from_class_names(root: str | Path, name: str) -> DatasetInfo:
    """DatasetInfo for a dataset described only by root/class_names.txt (future classes -> 0)."""
    return DatasetInfo(name, read_class_names(Path(root) / CLASS_NAMES_FILE), future_label=0)


class FolderReader(SegmentationReader):
    """images/ + masks/ + class_names.txt, with labels already in the canonical space."""

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.info = info_from_class_names(self.root, "folder")
        self.image_dir = self.root / "images"
        self.mask_dir = self.root / "masks"

    @cached_property
    def _images(self) -> dict[str, Path]:
        """Every image in images/, by stem; two files with one stem would make ids ambiguous."""
        try:
            entries = sorted(self.image_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            raise DatasetError(f"missing image folder {self.image_dir} (expected <id>.jpg or <id>.png files)") from None
        except OSError as exc:  # no permission, a symbolic link loop
            raise DatasetError(f"cannot list image folder {self.image_dir}: {exc.strerror or exc}") from None
        images: dict[str, Path] = {}
        for path in entries:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            check_utf8_name(path)
            if path.stem in images:
                raise DatasetError(f"two images share the id {path.stem!r}: {images[path.stem]} and {path}")
            images[path.stem] = path
        if not images:
            raise DatasetError(f"image folder {self.image_dir} holds no .jpg or .png files")
        return images

    def _split_lists(self) -> list[str]:
        """The split list files in root: `*.txt` files (not the class names) whose lines are image ids.

        Reading the lines keeps a stray README.txt or notes.txt from passing for a split list.
        """
        lists = []
        for path in sorted(self.root.glob("*.txt")):
            if not path.is_file() or path.name == CLASS_NAMES_FILE:
                continue
            # A list that cannot be read is an error, not "no list": that would use every image for every split.
            text = read_text(path, "text file", "a split list of image ids (or no .txt besides class names)")
            try:
                ids = parse_id_lines(text, path)
            except DatasetError:  # lines that are no ids (notes, a three-column table): not a split list
                continue
            if ids and all(sample_id in self._images for sample_id in ids):
                lists.append(path.name)
        return lists

    @cached_property
    def _ids(self) -> list[str]:
        if self.split is None:
            return list(self._images)
        split_file = self.root / f"{self.split}.txt"
        if split_file.is_file():
            return read_id_list(split_file, "split list")
        lists = self._split_lists()
        if lists:
            raise DatasetError(
                f"missing split list {split_file} for split {self.split!r}; {self.root} has {', '.join(lists)} "
                "(a folder with split lists needs one per split; without any, every image is used)"
            )
        warnings.warn(
            f"folder dataset {self.root} has no split lists (<split>.txt): split {self.split!r} uses every "
            f"image in {self.image_dir}, so training and test images are the same",
            stacklevel=2,
        )
        return list(self._images)

    def ids(self) -> list[str]:
        return list(self._ids)

    def read(self, sample_id: str) -> Sample:
        image_path = self._images.get(sample_id)
        if image_path is None:
            raise DatasetError(f"missing image for id {sample_id!r}: expected {self.image_dir / sample_id}.jpg or .png")
        image_bytes = read_file_bytes(image_path, "image")
        image, image_format = decode_image(image_bytes, image_path)

        mask_path = self.mask_dir / f"{sample_id}.png"
        label = decode_index_png(read_file_bytes(mask_path, "mask"), mask_path, "mask")
        check_same_size(image, label, image_path, mask_path)
        check_label_range(label, self.info.num_classes, mask_path)
        return Sample(sample_id, image, label, None, image_bytes, image_format)
