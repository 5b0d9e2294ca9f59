"""The synthetic generator: VOC layout, determinism, label consistency, occlusion, idempotency."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eir.data.synthetic import (
    SYNTHETIC_CLASS_NAMES,
    SYNTHETIC_CLASSES,
    SyntheticScene,
    generate_synthetic,
    image_rng,
    render_scene,
)

NUM_IMAGES = 40
SIZE = 64


def _generate(out: Path, num_images: int = NUM_IMAGES, **kwargs: object) -> Path:
    return generate_synthetic(out, num_images, image_size=SIZE, progress=False, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("syn") / "voc")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _index_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P", f"{path} has mode {im.mode}"
        return np.array(im)


def _scenes(count: int, size: int = SIZE) -> list[SyntheticScene]:
    return [render_scene(np.random.default_rng(1000 + i), size, 4) for i in range(count)]


def test_class_names_are_a_latin_square_of_attributes() -> None:
    assert len(SYNTHETIC_CLASS_NAMES) == 21
    assert SYNTHETIC_CLASS_NAMES[0] == "background"
    assert SYNTHETIC_CLASS_NAMES[1] == "red_flat_disc"
    assert SYNTHETIC_CLASS_NAMES[6] == "red_checkered_square"  # hue 0, row 1: shape 1, texture 2
    assert SYNTHETIC_CLASS_NAMES[20] == "purple_flat_triangle"  # hue 4, row 3: shape 2, texture 0
    assert len(set(SYNTHETIC_CLASS_NAMES)) == 21
    attributes = [(c.hue, c.texture, c.shape) for c in SYNTHETIC_CLASSES]
    for a, b in ((0, 1), (0, 2), (1, 2)):  # any two attributes identify the class...
        assert len({(t[a], t[b]) for t in attributes}) == 20
    for a in range(3):  # ...but no single one does: each value is shared by four classes
        assert set(Counter(t[a] for t in attributes).values()) == {4}


def test_layout_and_file_counts(dataset: Path) -> None:
    ids = [f"syn_{i:06d}" for i in range(NUM_IMAGES)]
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        assert sorted(p.name for p in (dataset / folder).iterdir()) == [f"{i}.png" for i in ids]
    train = (dataset / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (dataset / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(val) == 8 and len(train) == 32  # round(40 * 0.2) = 8
    assert sorted(train + val) == ids and train == sorted(train) and val == sorted(val)
    assert (dataset / "class_names.txt").read_text().splitlines() == list(SYNTHETIC_CLASS_NAMES)
    assert json.loads((dataset / "SYNTHETIC.json").read_text()) == {
        "generator": "eir.data.synthetic",
        "version": 1,
        "seed": 0,
        "num_images": NUM_IMAGES,
        "image_size": SIZE,
        "val_fraction": 0.2,
        "max_objects": 4,
    }
    assert not list(dataset.parent.glob("*.tmp-*"))
    with Image.open(dataset / "JPEGImages/syn_000000.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (SIZE, SIZE))


def test_labels_and_instances_are_consistent(dataset: Path) -> None:
    for path in sorted((dataset / "SegmentationClass").iterdir()):
        label = _index_png(path)
        instances = _index_png(dataset / "SegmentationObject" / path.name)
        assert label.shape == instances.shape == (SIZE, SIZE)
        assert label.max() <= 20
        np.testing.assert_array_equal(instances > 0, label > 0)
        ids = np.unique(instances[instances > 0])
        assert ids.tolist() == list(range(1, len(ids) + 1)), path  # contiguous 1..N
        for instance_id in ids:
            assert np.unique(label[instances == instance_id]).size == 1, (path, instance_id)


def test_files_hold_the_rendered_scene(dataset: Path) -> None:
    scene = render_scene(image_rng(0, 3), SIZE, 4)
    with Image.open(dataset / "JPEGImages/syn_000003.png") as im:
        np.testing.assert_array_equal(np.asarray(im), scene.image)
    np.testing.assert_array_equal(_index_png(dataset / "SegmentationClass/syn_000003.png"), scene.label)
    np.testing.assert_array_equal(_index_png(dataset / "SegmentationObject/syn_000003.png"), scene.instances)
    assert len(scene.objects) >= 1 and scene.label.any()


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = _generate(tmp_path / "again")
    assert _hashes(again) == _hashes(dataset)
    other = _hashes(_generate(tmp_path / "other", seed=1))
    same = _hashes(dataset)
    assert other.keys() == same.keys()
    assert other["JPEGImages/syn_000000.png"] != same["JPEGImages/syn_000000.png"]
    assert other["ImageSets/Segmentation/val.txt"] != same["ImageSets/Segmentation/val.txt"]


def test_an_image_does_not_depend_on_how_many_are_generated(dataset: Path, tmp_path: Path) -> None:
    small = _hashes(_generate(tmp_path / "small", num_images=5))
    full = _hashes(dataset)
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        name = f"{folder}/syn_000004.png"
        assert small[name] == full[name]


def test_every_class_occurs_roughly_uniformly(tmp_path: Path) -> None:
    root = _generate(tmp_path / "big", num_images=400)
    images_with = Counter()
    for path in (root / "SegmentationClass").iterdir():
        images_with.update(int(c) for c in np.unique(_index_png(path)) if c != 0)
    assert sorted(images_with) == list(range(1, 21))
    mean = sum(images_with.values()) / 20
    assert min(images_with.values()) > 0.5 * mean and max(images_with.values()) < 1.5 * mean


def test_later_objects_hide_earlier_ones() -> None:
    scenes = _scenes(100)
    occluded = 0
    for scene in scenes:
        covered = np.zeros((SIZE, SIZE), dtype=bool)
        for obj in reversed(scene.objects):  # topmost first
            visible = obj.mask & ~covered
            if obj.instance_id == 0:
                assert not visible.any()
            else:
                np.testing.assert_array_equal(scene.instances == obj.instance_id, visible)
                assert (scene.label[visible] == obj.class_id).all()
            occluded += bool((obj.mask & covered).any())
            covered |= obj.mask
    # Each occlusion changes what an earlier object's mask shows; it must not be rare.
    assert occluded >= 25


def test_a_class_is_not_given_away_by_a_pixel_colour() -> None:
    """Four classes share each hue: most object pixels have a colour that other classes use too."""
    classes_of_bin: dict[tuple[int, ...], set[int]] = {}
    bins_of_pixels = []
    for scene in _scenes(200):
        fg = scene.label > 0
        bins = [tuple(b) for b in (scene.image[fg] // 32).tolist()]
        for b, c in zip(bins, scene.label[fg].tolist()):
            classes_of_bin.setdefault(b, set()).add(c)
        bins_of_pixels += bins
    shared = sum(len(classes_of_bin[b]) >= 2 for b in bins_of_pixels) / len(bins_of_pixels)
    assert shared > 0.9


def test_rerun_is_idempotent_and_other_parameters_are_refused(dataset: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert _generate(dataset) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before
    with pytest.raises(FileExistsError, match=str(dataset)):
        _generate(dataset, seed=7)
    with pytest.raises(FileExistsError, match="no readable SYNTHETIC.json"):
        _generate(dataset / "JPEGImages")


def test_an_empty_output_folder_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert _generate(out, num_images=2) == out
    assert (out / "SYNTHETIC.json").is_file()
    assert (out / "ImageSets/Segmentation/val.txt").read_text().split() != []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "num_images=0"),
        ({"image_size": 16}, "image_size=16"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"max_objects": 0}, "max_objects=0"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"num_images": 3, "image_size": SIZE, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "x", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_progress_bar_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_synthetic(tmp_path / "p", 2, image_size=SIZE, progress=True)
    assert "synthetic images" in capsys.readouterr().err


def test_the_synthetic_reader_reads_the_output(dataset: Path) -> None:
    registry = pytest.importorskip("eir.data.registry")
    reader = registry.open_reader("synthetic", dataset, "train")
    assert reader.info.class_names == SYNTHETIC_CLASS_NAMES
    assert reader.info.num_classes == 20
    train_ids = (dataset / "ImageSets/Segmentation/train.txt").read_text().split()
    assert reader.ids() == train_ids
    sample = reader.read(train_ids[0])
    assert sample.image.shape == (SIZE, SIZE, 3) and sample.image_format == "png"
    np.testing.assert_array_equal(sample.label, _index_png(dataset / "SegmentationClass" / f"{train_ids[0]}.png"))
    assert sample.instances is not None
    np.testing.assert_array_equal(sample.instances > 0, sample.label > 0)
