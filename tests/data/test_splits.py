"""Per-step image selection from the classes column, written once per dataset/task/setting."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eir import storage
from eir.data.base import DatasetInfo, Sample, SegmentationReader
from eir.data.ingest import Manifest, ingest
from eir.data.registry import open_reader
from eir.data.splits import select_ids, step_splits, task_key
from eir.data.synthetic import generate_synthetic
from eir.storage import Location
from eir.tasks import Task, TaskError, get_task, task_from_steps

# The toy steps hold 2 images each, below the small-step warning threshold.
pytestmark = pytest.mark.filterwarnings("ignore:.*training images:UserWarning")

TOY_INFO = DatasetInfo("toy", ("background", "a", "b", "c"))
# id -> classes present (besides background); 255 marks an ignored border in "b_c".
TOY_IMAGES = {"a": [1], "a_b": [1, 2], "b_c": [2, 3, 255], "c": [3]}


class ToyReader(SegmentationReader):
    """Four 8x8 images whose labels hold exactly the classes of TOY_IMAGES."""

    info = TOY_INFO

    def ids(self) -> list[str]:
        return list(TOY_IMAGES)

    def read(self, sample_id: str) -> Sample:
        label = np.zeros((8, 8), dtype=np.uint8)
        for row, value in enumerate(TOY_IMAGES[sample_id]):
            label[row] = value
        image = np.full((8, 8, 3), 128, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return Sample(sample_id, image, label, None, buffer.getvalue(), "png")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    out = storage.resolve(tmp_path_factory.mktemp("toy") / "train")
    return ingest(ToyReader(), out, split="train", source="toy", progress=False)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    raw = generate_synthetic(tmp_path_factory.mktemp("splits") / "raw", 30, image_size=48, progress=False)
    out = storage.resolve(raw.parent / "train")
    return raw, ingest(open_reader("synthetic", raw, "train"), out, split="train", source=str(raw), progress=False)


def toy_task(setting: str, steps: list[list[int]] | None = None) -> Task:
    return task_from_steps("toy", steps or [[1], [2], [3]], setting, num_classes=3)  # type: ignore[arg-type]


def split_file(output_root: Location, manifest: Manifest, task: Task, purpose: str = "train") -> Path:
    return Path(output_root.path) / "splits" / manifest.checksum[:16] / f"{task_key(task)}-{purpose}.json"


def test_hand_checked_selection_on_toy_labels(toy: Manifest) -> None:
    assert select_ids(toy_task("overlapped"), toy, purpose="train") == [["a", "a_b"], ["a_b", "b_c"], ["b_c", "c"]]
    # Disjoint: no future class in the image (a_b is not in step 0, b_c not in step 1; 255 is allowed).
    assert select_ids(toy_task("disjoint"), toy, purpose="train") == [["a"], ["a_b"], ["b_c", "c"]]
    # Test images: any class seen so far.
    assert select_ids(toy_task("overlapped"), toy, purpose="test") == [
        ["a", "a_b"],
        ["a", "a_b", "b_c"],
        ["a", "a_b", "b_c", "c"],
    ]


def test_selection_on_synthetic_matches_the_label_files(synthetic: tuple[Path, Manifest]) -> None:
    raw, manifest = synthetic
    ids = (raw / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    present = {i: set(np.unique(np.array(Image.open(raw / "SegmentationClass" / f"{i}.png"))).tolist()) for i in ids}
    steps = [set(range(1, 16)), set(range(16, 21))]
    expected = {
        "overlapped": [[i for i in ids if present[i] & step] for step in steps],
        "disjoint": [
            [i for i in ids if present[i] & step and present[i] <= set().union(*steps[: t + 1]) | {0, 255}]
            for t, step in enumerate(steps)
        ],
    }
    # The data must make the two settings differ, or this test would not tell them apart.
    assert expected["disjoint"][0] and expected["disjoint"][0] != expected["overlapped"][0]
    assert expected["disjoint"][1] == expected["overlapped"][1]  # last step: nothing is future
    for setting, want in expected.items():
        task = get_task("synthetic", "15-5", setting)  # type: ignore[arg-type]
        assert select_ids(task, manifest, purpose="train") == want


def test_split_file_is_written_once_and_reused(toy: Manifest, tmp_path: Path) -> None:
    root = storage.resolve(tmp_path)
    task = toy_task("overlapped")
    with pytest.warns(UserWarning, match=r"step 0 \(classes \[1\]\) has only 2 training images"):
        first = step_splits(task, toy, root)
    path = split_file(root, toy, task)
    assert path.is_file()
    data = storage.read_json(storage.resolve(path))
    assert data["counts"] == [2, 2, 2] == first.counts
    assert data["ids"] == [list(step) for step in first.ids]
    assert (data["task"], data["setting"], data["purpose"]) == (task.name, "overlapped", "train")
    assert data["dataset_checksum"] == toy.checksum == first.dataset_checksum
    assert first.step_ids(1) == ["a_b", "b_c"]

    mtime = path.stat().st_mtime_ns
    with pytest.warns(UserWarning, match=r"step 0 \(classes \[1\]\) has only 2 training images"):
        second = step_splits(task, toy, root)  # loaded from the file, and still warned about
    assert second == first
    assert path.stat().st_mtime_ns == mtime
    assert list(path.parent.iterdir()) == [path]


def test_the_split_file_is_the_source_of_truth(toy: Manifest, tmp_path: Path) -> None:
    """A later call reads the recorded ids instead of recomputing them."""
    root = storage.resolve(tmp_path)
    task = toy_task("overlapped")
    first = step_splits(task, toy, root)
    path = split_file(root, toy, task)
    data = storage.read_json(storage.resolve(path))
    data["ids"] = [["a"], ["a_b"], ["c"]]
    storage.write_json_atomic(storage.resolve(path), data)
    reread = step_splits(task, toy, root)
    assert reread.ids == (("a",), ("a_b",), ("c",))
    assert reread.checksum == first.checksum  # the recorded checksum


def test_another_task_or_setting_gets_its_own_file(toy: Manifest, tmp_path: Path) -> None:
    root = storage.resolve(tmp_path)
    overlapped = step_splits(toy_task("overlapped"), toy, root)
    disjoint = step_splits(toy_task("disjoint"), toy, root)
    reordered = step_splits(toy_task("overlapped", [[2], [1], [3]]), toy, root)
    assert len({overlapped.task_key, disjoint.task_key, reordered.task_key}) == 3
    assert len({overlapped.checksum, disjoint.checksum, reordered.checksum}) == 3
    assert disjoint.ids == (("a",), ("a_b",), ("b_c", "c"))
    assert reordered.ids == (("a_b", "b_c"), ("a", "a_b"), ("b_c", "c"))
    assert len(list((tmp_path / "splits" / toy.checksum[:16]).iterdir())) == 3


def test_train_and_test_splits_are_separate_files(toy: Manifest, tmp_path: Path) -> None:
    root = storage.resolve(tmp_path)
    task = toy_task("overlapped")
    train = step_splits(task, toy, root, purpose="train")
    test = step_splits(task, toy, root, purpose="test")
    assert test.counts == [2, 3, 4] and train.counts == [2, 2, 2]
    assert train.checksum != test.checksum
    assert split_file(root, toy, task, "train").is_file() and split_file(root, toy, task, "test").is_file()


def test_a_step_without_images_is_an_error_naming_it(toy: Manifest, tmp_path: Path) -> None:
    # Disjoint, step 0 learns class 2: every image with class 2 also holds a future class.
    task = toy_task("disjoint", [[2], [1], [3]])
    with pytest.raises(TaskError, match=r"step 0 \(classes \[2\]\) has 0 training images"):
        step_splits(task, toy, storage.resolve(tmp_path))
    assert not (tmp_path / "splits").exists() or not any((tmp_path / "splits").rglob("*.json"))
    # Test splits are not size-checked: an empty test step is only reported through its count.
    assert step_splits(task, toy, storage.resolve(tmp_path), purpose="test").counts == [2, 3, 4]
