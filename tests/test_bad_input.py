"""Bad input as a user meets it: at `launch.py`, with the message they read and nothing half-written.

The readers, the task logic and the config each test their own errors in detail (tests/data,
test_tasks.py, test_config.py, tests/replay); this module drives the same mistakes through the
command line, so each one is known to reach the user as one clear line (exit code 2, no
traceback) naming the file, key or value and what was expected. A one-class step without a
NaN anywhere needs a real run: tests/train/test_object_store_run.py (task 19-1).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import launch
from eir import storage
from eir.config import dump_yaml, load_config
from eir.data.synthetic import generate_synthetic
from eir.model import build_model

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
CLASSES = ["background", "cat", "dog", "bird"]


def folder_dataset(root: Path, masks: dict[str, np.ndarray]) -> Path:
    """A generic-layout dataset (eir/data/folder.py): class names, RGB images and index masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    for name, mask in masks.items():
        Image.fromarray(np.full((*mask.shape, 3), 90, np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
    (root / "train.txt").write_text("\n".join(masks) + "\n")
    return root


def written_files(folder: Path) -> list[Path]:
    """Files a failed command left behind (an empty parent folder holds nothing a run could trust)."""
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run launch.py in-process; it must exit 2 with one `error:` line (no traceback)."""
    code = launch.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert "Traceback" not in err
    return err


def test_corrupt_image_names_the_file_and_writes_nothing(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw", {"a": np.zeros((4, 4)), "b": np.ones((4, 4))})
    (root / "images" / "b.png").write_bytes(b"not an image")
    err = fails(capsys, "prepare", "folder", "--root", str(root), "--split", "train", "--out", str(tmp_path / "out"))
    assert "unreadable image" in err and "images/b.png" in err
    assert written_files(tmp_path / "out") == []


def test_label_outside_the_classes_names_file_and_values(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw", {"a": np.array([[0, 1], [7, 3]])})
    err = fails(capsys, "prepare", "folder", "--root", str(root), "--split", "train", "--out", str(tmp_path / "out"))
    assert "masks/a.png" in err and "[7]" in err
    assert written_files(tmp_path / "out") == []


def test_image_label_size_mismatch_gives_both_sizes(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw", {"a": np.zeros((4, 4))})
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "images" / "a.png")
    err = fails(capsys, "prepare", "folder", "--root", str(root), "--split", "train", "--out", str(tmp_path / "out"))
    assert "size mismatch" in err and "6x4" in err and "4x4" in err
    assert written_files(tmp_path / "out") == []


def test_empty_split_is_refused(tmp_path: Path, capsys) -> None:
    root = folder_dataset(tmp_path / "raw", {"a": np.zeros((4, 4))})
    (root / "val.txt").write_text("\n")
    err = fails(capsys, "prepare", "folder", "--root", str(root), "--split", "val", "--out", str(tmp_path / "out"))
    assert "val.txt" in err and "empty" in err
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("task.name=7-7", ["task.name='7-7'", "valid increments for base 7: [1, 13]"]),
        ("task.name=foo", ["task.name='foo'", "malformed task name"]),
        ("task.class_order=[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,99]", ["class_order", "99", "1..20"]),
        ("method.name=magic", ["method.name", "magic", "eir"]),
        ("train.epoch=3", ["train.epoch", "train.epochs"]),
    ],
)
def test_unknown_task_class_method_and_key(override: str, expected: list[str], tmp_path: Path, capsys) -> None:
    err = fails(capsys, "run", QUICKSTART, "--dry-run", f"run.output_dir={tmp_path}", override)
    for fragment in expected:
        assert fragment in err
    assert not (tmp_path / "datasets").exists(), "a bad config fails before any dataset is generated or ingested"


def test_a_step_without_training_images_names_the_step(tmp_path: Path, capsys) -> None:
    # "bird" (class 3) is in no mask: step 1 of the 2-1 task has nothing to learn from.
    masks = {f"i{k}": np.array([[0, 1], [2, 0]]) for k in range(4)}
    root = folder_dataset(tmp_path / "raw", masks)
    err = fails(capsys, "run", QUICKSTART, "--dry-run", f"run.output_dir={tmp_path / 'runs'}", "dataset.name=folder",
                f"dataset.root={root}", "dataset.test_split=train", "task.name=2-1")
    assert "step 1 (classes [3]) has 0 training images" in err


def test_memory_size_zero_warns_and_larger_than_the_candidates_is_covered_by_the_stores() -> None:
    with pytest.warns(UserWarning, match=r"memory.size=0 with method 'eir': nothing is stored"):
        load_config(QUICKSTART, ["method.name=eir", "memory.size=0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(QUICKSTART, ["method.name=finetune", "memory.size=0"])  # no memory: nothing to warn about
    # memory.size larger than the candidates: tests/replay/test_store.py and test_image_store.py
    # assert "memory.size=200 but only 7 instances were found; stored 7".


def test_a_checkpoint_from_another_task_is_refused_by_evaluate(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "synthetic"
    generate_synthetic(raw, 12, seed=0, image_size=32, progress=False)
    config = load_config(QUICKSTART, [f"run.output_dir={tmp_path}", "run.name=r", "task.name=15-5", "model.weights=null"])
    run = tmp_path / "r"
    (run / "step_0").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(config))
    foreign = build_model("mobilenet_v2", [10], weights=None)  # a 10-5 task's step 0, not 15-5's
    buffer = io.BytesIO()
    torch.save({"model": foreign.state_dict(), "head_sizes": [10]}, buffer)
    (run / "step_0" / "model.pt").write_bytes(buffer.getvalue())
    storage.mark_complete(storage.resolve(run / "step_0"))
    err = fails(capsys, "evaluate", str(run), "--dataset", "synthetic", "--root", str(raw), "--split", "val", "--step", "0")
    assert "model.pt" in err and "[10]" in err and "[15]" in err and "different task" in err

