"""Dataset names -> readers, so configs name a dataset and a root instead of a class."""

from __future__ import annotations

from pathlib import Path

from eir.data.ade20k import ADE20K_INFO, ADE20KReader
from eir.data.base import DatasetError, DatasetInfo, SegmentationReader
from eir.data.camvid import CAMVID_INFO, CamVidReader
from eir.data.folder import FolderReader, info_from_class_names
from eir.data.voc import CLASS_DIR, VOC_INFO, VOCReader

DATASETS = ("voc", "ade20k", "camvid", "folder", "synthetic")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def dataset_info(name: str, root: str | Path) -> DatasetInfo:
    """The label space of a dataset; folder and synthetic read it from root/class_names.txt."""
    _check_name(name)
    fixed = {"voc": VOC_INFO, "ade20k": ADE20K_INFO, "camvid": CAMVID_INFO}
    if name in fixed:
        return fixed[name]
    return info_from_class_names(root, name)


def open_reader(name: str, root: str | Path, split: str, *, ade_ignore_other: bool = False) -> SegmentationReader:
    """A reader for one split of a named dataset at root; `ade_ignore_other` only concerns ADE20K (its raw 0)."""
    _check_name(name)
    if name == "voc":
        return VOCReader(root, split)
    if name == "ade20k":
        return ADE20KReader(root, split, ignore_other=ade_ignore_other)
    if name == "camvid":
        return CamVidReader(root, split)
    if name == "folder":
        return FolderReader(root, split)
    # The synthetic generator writes the VOC layout with its own class list and only
    # official-style SegmentationClass masks.
    return VOCReader(root, split, info=dataset_info(name, root), label_dir=CLASS_DIR)
