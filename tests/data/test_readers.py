"""Dataset readers on the real shared fixtures and on tiny generated layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eir.data.ade20k import ADE20K_INFO, ADE20K_INFO_IGNORE_OTHER, ADE20KReader
from eir.data.base import DatasetError
from eir.data.camvid import CAMVID_INFO, CamVidReader
from eir.data.folder import FolderReader
from eir.data.registry import DATASETS, dataset_info, open_reader
from eir.data.voc import VOC_INFO, VOCReader
from eir.labels import IGNORE_LABEL

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
VOC_IDS = ["2011_000003", "2011_000006", "2011_000025"]
VOC_CLASSES = {"2011_000003": {0, 5, 15}, "2011_000006": {0, 9, 15, 18}, "2011_000025": {0, 6, 7}}
ADE_IDS = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA.resolve()


# ---------------------------------------------------------------- helpers


def write_rgb(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_index(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """An 8-bit index PNG; with palette=True a 'P' image whose colours differ from the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([(255 - i) % 256 for i in range(256) for _ in range(3)])
    image.save(path)


def tiny_voc(root: Path, ids: list[str], labels: dict[str, np.ndarray]) -> Path:
    """A VOC layout with PNG images (as the synthetic generator writes) and palette labels."""
    for number, sample_id in enumerate(ids):
        height, width = labels[sample_id].shape
        write_rgb(root / "JPEGImages" / f"{sample_id}.png", height, width, seed=number)
        write_index(root / "SegmentationClass" / f"{sample_id}.png", labels[sample_id], palette=True)
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("\n".join(ids) + "\n")
    return root


def voc_from_shared(tmp_path: Path, shared: Path) -> Path:
    """The 3 shared VOC samples behind symlinks, plus the split list they lack."""
    root = tmp_path / "VOC2012"
    root.mkdir()
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "SegmentationObject"):
        (root / folder).symlink_to(shared / "voc2012_samples" / folder)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(VOC_IDS) + "\n")
    return root


# ---------------------------------------------------------------- VOC


def test_voc_reads_shared_samples(tmp_path: Path, shared_data: Path) -> None:
    root = voc_from_shared(tmp_path, shared_data)
    reader = VOCReader(root, "train")
    assert reader.ids() == VOC_IDS
    assert len(reader) == 3
    seen = set()
    for sample in reader:
        image_path = root / "JPEGImages" / f"{sample.id}.jpg"
        assert sample.image_bytes == image_path.read_bytes()
        assert sample.image_format == "jpeg"
        assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
        # palette indices, not colours: identical to PIL's index array
        expected = np.array(Image.open(root / "SegmentationClass" / f"{sample.id}.png"))
        np.testing.assert_array_equal(sample.label, expected)
        assert set(np.unique(sample.label).tolist()) - {IGNORE_LABEL} == VOC_CLASSES[sample.id]
        assert sample.instances is not None
        assert sample.instances.shape == sample.label.shape and sample.instances.max() >= 3
        seen |= set(np.unique(sample.label).tolist())
    assert {5, 6, 7, 9, 15, 18} <= seen  # bottle, bus, car, chair, person, sofa
    assert VOC_INFO.class_names[5] == "bottle" and VOC_INFO.class_names[18] == "sofa"
    assert VOC_INFO.num_classes == 20


def test_voc_label_dir_choice_on_shared_samples(shared_data: Path) -> None:
    root = shared_data / "voc2012_samples"
    # SegmentationClass of 2011_000025 holds no 255 but its Aug mask does: that tells them apart.
    official = VOCReader(root, "val", ids=["2011_000025"]).read("2011_000025")
    aug = VOCReader(root, "train_aug", ids=["2011_000025"]).read("2011_000025")
    forced = VOCReader(root, "val", ids=["2011_000025"], label_dir="SegmentationClassAug").read("2011_000025")
    assert IGNORE_LABEL not in official.label
    assert IGNORE_LABEL in aug.label
    np.testing.assert_array_equal(forced.label, aug.label)


def test_voc_missing_split_list_names_the_file(shared_data: Path) -> None:
    reader = VOCReader(shared_data / "voc2012_samples", "train")
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/train\.txt"):
        reader.ids()


def test_voc_generated_png_layout(tmp_path: Path) -> None:
    label = np.array([[0, 1, 1], [20, 255, 0]], dtype=np.uint8)
    root = tiny_voc(tmp_path, ["a", "b"], {"a": label, "b": np.zeros((2, 3), np.uint8)})
    reader = VOCReader(root, "train")
    assert reader.ids() == ["a", "b"]
    sample = reader.read("a")
    np.testing.assert_array_equal(sample.label, label)
    assert sample.image_format == "png"
    assert sample.instances is None
    assert sample.image_bytes == (root / "JPEGImages" / "a.png").read_bytes()


def test_voc_auto_falls_back_to_aug_labels(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.zeros((2, 3), np.uint8)})
    (root / "SegmentationClass" / "a.png").unlink()
    aug = np.array([[3, 3, 0], [0, 0, 255]], dtype=np.uint8)
    write_index(root / "SegmentationClassAug" / "a.png", aug, palette=True)
    np.testing.assert_array_equal(VOCReader(root, "train").read("a").label, aug)


def test_voc_missing_label_names_both_folders(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.zeros((2, 3), np.uint8)})
    (root / "SegmentationClass" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClass/a\.png \(or .*SegmentationClassAug/a\.png\)"):
        VOCReader(root, "train").read("a")


def test_voc_reads_instance_maps(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.array([[0, 7], [7, 7]], np.uint8)})
    instances = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    write_index(root / "SegmentationObject" / "a.png", instances, palette=True)
    np.testing.assert_array_equal(VOCReader(root, "train").read("a").instances, instances)


def test_voc_ids_are_read_once(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a", "b"], {k: np.zeros((2, 2), np.uint8) for k in "ab"})
    reader = VOCReader(root, "train")
    first = reader.ids()
    first.append("mutated")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("b\n")
    assert reader.ids() == ["a", "b"]


def test_voc_missing_image(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.zeros((2, 3), np.uint8)})
    (root / "JPEGImages" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"JPEGImages/a\.jpg"):
        VOCReader(root, "train").read("a")


def test_voc_corrupt_image(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.zeros((2, 3), np.uint8)})
    (root / "JPEGImages" / "a.png").write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=r"unreadable image .*JPEGImages/a\.png"):
        VOCReader(root, "train").read("a")


def test_voc_label_out_of_range(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.array([[0, 21], [1, 255]], np.uint8)})
    with pytest.raises(DatasetError, match=r"SegmentationClass/a\.png holds values \[21\]"):
        VOCReader(root, "train").read("a")


def test_voc_label_size_mismatch(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.zeros((2, 3), np.uint8)})
    write_index(root / "SegmentationClass" / "a.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"size mismatch.*SegmentationClass/a\.png is 3x3"):
        VOCReader(root, "train").read("a")


def test_voc_instance_size_mismatch(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.zeros((2, 3), np.uint8)})
    write_index(root / "SegmentationObject" / "a.png", np.zeros((2, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"SegmentationObject/a\.png is 4x2"):
        VOCReader(root, "train").read("a")


def test_voc_deeplab_style_split_list(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a.1"], {"a.1": np.zeros((2, 2), np.uint8)})
    lines = "/JPEGImages/b.jpg /SegmentationClassAug/b.png\na.1\n"
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(lines)
    assert VOCReader(root, "train_aug").ids() == ["b", "a.1"]


def test_voc_empty_split_list(tmp_path: Path) -> None:
    root = tiny_voc(tmp_path, ["a"], {"a": np.zeros((2, 3), np.uint8)})
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"val\.txt is empty"):
        VOCReader(root, "val").ids()


# ---------------------------------------------------------------- ADE20K


def ade_from_shared(tmp_path: Path, shared: Path) -> Path:
    sample_data = shared / "ade20k_samples" / "sampleData"
    root = tmp_path / "ADEChallengeData2016"
    for kind, suffix in (("images", ".jpg"), ("annotations", ".png")):
        folder = root / kind / "validation"
        folder.mkdir(parents=True)
        for sample_id in ADE_IDS:
            (folder / f"{sample_id}{suffix}").symlink_to(sample_data / kind / f"{sample_id}{suffix}")
    return root


def test_ade_reads_shared_samples(tmp_path: Path, shared_data: Path) -> None:
    root = ade_from_shared(tmp_path, shared_data)
    reader = ADE20KReader(root, "val")
    assert reader.ids() == ADE_IDS
    assert ADE20KReader(root, "validation").ids() == ADE_IDS
    sample = reader.read("ADE_val_00000003")
    raw = np.array(Image.open(root / "annotations" / "validation" / "ADE_val_00000003.png"))
    np.testing.assert_array_equal(sample.label, raw)  # DKD's convention: raw 0 ("other") is background 0
    assert np.unique(sample.label).tolist() == [0, 1, 2, 3, 5, 7, 12, 21, 44, 81, 88, 97, 103]
    assert sample.image.shape == (300, 400, 3)
    assert sample.image_format == "jpeg" and sample.instances is None
    assert reader.info is ADE20K_INFO

    ignoring = ADE20KReader(root, "val", ignore_other=True)
    expected = raw.copy()
    expected[raw == 0] = IGNORE_LABEL
    np.testing.assert_array_equal(ignoring.read("ADE_val_00000003").label, expected)
    assert np.unique(expected).tolist() == [1, 2, 3, 5, 7, 12, 21, 44, 81, 88, 97, 103, 255]
    assert ignoring.info is ADE20K_INFO_IGNORE_OTHER
    assert open_reader("ade20k", root, "val", ade_ignore_other=True).info is ADE20K_INFO_IGNORE_OTHER
    assert open_reader("ade20k", root, "val").info is ADE20K_INFO


def test_ade_info() -> None:
    names = ADE20K_INFO.class_names
    assert ADE20K_INFO.num_classes == 150 and len(set(names)) == 151
    assert (names[0], names[1], names[3], names[13], names[21], names[150]) == (
        "background",
        "wall",
        "sky",
        "person",
        "car",
        "flag",
    )
    # Future classes are ignored in test labels under both conventions; only one has a background class.
    assert ADE20K_INFO.future_label == ADE20K_INFO_IGNORE_OTHER.future_label == 255
    assert ADE20K_INFO.background_is_class and not ADE20K_INFO_IGNORE_OTHER.background_is_class
    assert ADE20K_INFO_IGNORE_OTHER.class_names == names


def test_ade_generated_and_out_of_range(tmp_path: Path) -> None:
    write_rgb(tmp_path / "images" / "training" / "x.jpg", 2, 2)
    annotations = tmp_path / "annotations" / "training"
    write_index(annotations / "x.png", np.array([[0, 1], [150, 7]]))
    np.testing.assert_array_equal(ADE20KReader(tmp_path, "train").read("x").label, np.array([[0, 1], [150, 7]]))
    ignoring = ADE20KReader(tmp_path, "train", ignore_other=True)
    np.testing.assert_array_equal(ignoring.read("x").label, np.array([[255, 1], [150, 7]]))
    write_index(annotations / "x.png", np.array([[0, 151], [150, 7]]))
    with pytest.raises(DatasetError, match=r"training/x\.png holds values \[151\]"):
        ADE20KReader(tmp_path, "training").read("x")


def test_ade_missing_split_folder_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"images/training"):
        ADE20KReader(tmp_path, "train").ids()
    with pytest.raises(DatasetError, match=r"'test'"):
        ADE20KReader(tmp_path, "test")


def test_ade_missing_annotation(tmp_path: Path) -> None:
    write_rgb(tmp_path / "images" / "validation" / "x.jpg", 2, 2)
    with pytest.raises(DatasetError, match=r"missing annotation: .*annotations/validation/x\.png"):
        ADE20KReader(tmp_path, "val").read("x")


# ---------------------------------------------------------------- CamVid


def test_camvid_shared_splits_and_mapping(shared_data: Path) -> None:
    root = shared_data / "camvid" / "CamVid"
    train = CamVidReader(root, "train")
    assert len(train) == 367 and len(CamVidReader(root, "val")) == 101
    assert train.ids()[0] == "0001TP_006690"
    sample = train.read("0001TP_006690")
    raw = np.array(Image.open(root / "trainannot" / "0001TP_006690.png"))
    # Unlabelled (11) -> background 0; Sky..Bicyclist (0..10) -> 1..11
    np.testing.assert_array_equal(sample.label, np.where(raw == 11, 0, raw + 1))
    assert sample.image.shape == (360, 480, 3) and sample.image_format == "png"
    assert sample.image_bytes == (root / "train" / "0001TP_006690.png").read_bytes()
    assert CAMVID_INFO.num_classes == 11 and CAMVID_INFO.class_names[1] == "sky"


def test_camvid_missing_split_list(shared_data: Path) -> None:
    with pytest.raises(DatasetError, match=r"CamVid/test\.txt"):
        CamVidReader(shared_data / "camvid" / "CamVid", "test").ids()


def tiny_camvid(root: Path, raw: np.ndarray) -> Path:
    write_rgb(root / "train" / "f1.png", *raw.shape)
    write_index(root / "trainannot" / "f1.png", raw)
    (root / "train.txt").write_text("/SegNet/CamVid/train/f1.png /SegNet/CamVid/trainannot/f1.png\n")
    return root


def test_camvid_generated_maps_every_raw_value(tmp_path: Path) -> None:
    raw = np.arange(12, dtype=np.uint8).reshape(3, 4)
    root = tiny_camvid(tmp_path, raw)
    expected = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]])
    np.testing.assert_array_equal(CamVidReader(root, "train").read("f1").label, expected)


def test_camvid_raw_value_out_of_range(tmp_path: Path) -> None:
    root = tiny_camvid(tmp_path, np.array([[0, 12], [11, 255]], np.uint8))
    with pytest.raises(DatasetError, match=r"trainannot/f1\.png holds raw values \[12, 255\]"):
        CamVidReader(root, "train").read("f1")


def test_camvid_bad_line_and_unknown_id(tmp_path: Path) -> None:
    root = tiny_camvid(tmp_path, np.zeros((2, 2), np.uint8))
    with pytest.raises(DatasetError, match=r"'nope' is not listed in .*train\.txt"):
        CamVidReader(root, "train").read("nope")
    (root / "val.txt").write_text("val/a.png\n")
    with pytest.raises(DatasetError, match=r"val\.txt line 1"):
        CamVidReader(root, "val").ids()


def test_camvid_size_mismatch(tmp_path: Path) -> None:
    root = tiny_camvid(tmp_path, np.zeros((2, 2), np.uint8))
    write_rgb(root / "train" / "f1.png", 3, 2)
    with pytest.raises(DatasetError, match=r"size mismatch: image .*train/f1\.png is 2x3"):
        CamVidReader(root, "train").read("f1")


# ---------------------------------------------------------------- generic folder


def tiny_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "class_names.txt").write_text("background\ncat\ndog\n")
    write_rgb(root / "images" / "a.png", 2, 2)
    write_rgb(root / "images" / "b.jpg", 2, 2)
    (root / "images" / "notes.txt").write_text("not an image")
    write_index(root / "masks" / "a.png", np.array([[0, 1], [2, 255]]))
    write_index(root / "masks" / "b.png", np.array([[2, 2], [0, 0]]))
    return root


def test_folder_reads_all_or_listed_ids(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path)
    reader = FolderReader(root)
    assert reader.info.name == "folder" and reader.info.class_names == ("background", "cat", "dog")
    assert reader.ids() == ["a", "b"]
    (root / "README.txt").write_text("Two test images.\n")  # a text file, but not a list of image ids
    with pytest.warns(UserWarning, match=rf"folder dataset {root} has no split lists .*split 'val' uses every image"):
        assert FolderReader(root, "val").ids() == ["a", "b"]  # no split lists at all: every image, said aloud
    (root / "train.txt").write_text("b\n")
    assert FolderReader(root, "train").ids() == ["b"]
    a = reader.read("a")
    np.testing.assert_array_equal(a.label, np.array([[0, 1], [2, 255]]))
    assert a.image_format == "png" and reader.read("b").image_format == "jpeg"


def test_folder_split_without_its_list_is_an_error_once_lists_exist(tmp_path: Path) -> None:
    """A typo'd test split must not silently score on every (training) image."""
    root = tiny_folder(tmp_path)
    (root / "train.txt").write_text("a\n")
    (root / "test.txt").write_text("b\n")
    with pytest.raises(DatasetError, match=rf"missing split list {root / 'vall.txt'} .*has test\.txt, train\.txt"):
        FolderReader(root, "vall").ids()
    assert FolderReader(root).ids() == ["a", "b"]  # no split asked for: every image


def test_folder_errors(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path)
    write_index(root / "masks" / "a.png", np.array([[0, 3], [2, 255]]))
    with pytest.raises(DatasetError, match=r"masks/a\.png holds values \[3\] .*expected 0\.\.2 or 255"):
        FolderReader(root).read("a")
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"missing mask: .*masks/b\.png"):
        FolderReader(root).read("b")
    with pytest.raises(DatasetError, match=r"missing image for id 'c'"):
        FolderReader(root).read("c")
    (root / "class_names.txt").write_text("background\n")
    with pytest.raises(DatasetError, match=r"class_names\.txt has 1 name"):
        FolderReader(root)
    (root / "class_names.txt").unlink()
    with pytest.raises(DatasetError, match=r"class_names\.txt"):
        FolderReader(root)


# ---------------------------------------------------------------- registry


def test_registry_unknown_name_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"'coco'.*voc, ade20k, camvid, folder, synthetic"):
        open_reader("coco", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"'coco'"):
        dataset_info("coco", tmp_path)


def test_registry_opens_each_kind(tmp_path: Path) -> None:
    assert set(DATASETS) == {"voc", "ade20k", "camvid", "folder", "synthetic"}
    assert isinstance(open_reader("voc", tmp_path, "train"), VOCReader)
    assert isinstance(open_reader("ade20k", tmp_path, "val"), ADE20KReader)
    assert isinstance(open_reader("camvid", tmp_path, "train"), CamVidReader)
    assert dataset_info("voc", tmp_path) is VOC_INFO
    assert dataset_info("camvid", tmp_path) is CAMVID_INFO
    assert dataset_info("ade20k", tmp_path) is ADE20K_INFO
    folder = tiny_folder(tmp_path / "folder")
    assert isinstance(open_reader("folder", folder, "train"), FolderReader)
    assert dataset_info("folder", folder).num_classes == 2


def test_registry_synthetic_reads_voc_layout_with_own_classes(tmp_path: Path) -> None:
    label = np.array([[0, 4], [4, 255]], dtype=np.uint8)
    root = tiny_voc(tmp_path, ["s0", "s1"], {"s0": label, "s1": np.zeros((2, 2), np.uint8)})
    (root / "class_names.txt").write_text("background\n" + "\n".join(f"shape{i}" for i in range(1, 5)) + "\n")
    reader = open_reader("synthetic", root, "train")
    assert reader.info.name == "synthetic" and reader.info.future_label == 0
    assert reader.info.class_names[4] == "shape4" and reader.info.num_classes == 4
    assert dataset_info("synthetic", root) == reader.info
    np.testing.assert_array_equal(reader.read("s0").label, label)
    # the label folder is fixed: no fallback to SegmentationClassAug
    (root / "SegmentationClass" / "s1.png").unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClass/s1\.png"):
        reader.read("s1")
