"""`launch.py evaluate` scores a run only on a dataset whose class ids mean the run's classes.

A run dir is built by hand (config.yaml, a finished step 0 with a tiny untrained model), so no
training and no Ray is needed: what is tested is the label-space check in front of the scoring.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import launch
from eir import storage
from eir.config import dump_yaml, load_config
from eir.data.prepare import ensure_prepared
from eir.model import build_model
from eir.train.evaluate_run import label_space_differences

QUICKSTART = str(Path(launch.__file__).resolve().parent / "experiments" / "quickstart.yaml")
TRAINED = ("background", "cat", "dog")


def folder_dataset(root: Path, classes: tuple[str, ...]) -> Path:
    root.mkdir(parents=True)
    (root / "class_names.txt").write_text("\n".join(classes) + "\n")
    for number, sample_id in enumerate(("a", "b")):
        (root / "images").mkdir(exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 60 * number, np.uint8)).save(root / "images" / f"{sample_id}.png")
        Image.fromarray(np.full((32, 32), number + 1, np.uint8)).save(root / "masks" / f"{sample_id}.png")
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("a\nb\n")
    return root


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A 1-1 run on a folder dataset (cat, dog) whose step 0 is finished; its training data is in the cache."""
    raw = folder_dataset(tmp_path / "trained-on", TRAINED)
    config = load_config(
        QUICKSTART,
        [
            f"run.output_dir={tmp_path / 'outputs'}",
            "run.name=r",
            "dataset.name=folder",
            f"dataset.root={raw}",
            "task.name=1-1",
            "model.weights=null",
        ],
    )
    ensure_prepared("folder", str(raw), "train", storage.resolve(tmp_path / "outputs"), progress=False)
    run_dir = tmp_path / "outputs" / "r"
    (run_dir / "step_0").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    model = build_model("mobilenet_v2", [1], weights=None)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "head_sizes": [1]}, buffer)
    (run_dir / "step_0" / "model.pt").write_bytes(buffer.getvalue())
    storage.mark_complete(storage.resolve(run_dir / "step_0"))
    return run_dir


def evaluate(run_dir: Path, root: Path) -> list[str]:
    return ["evaluate", str(run_dir), "--dataset", "folder", "--root", str(root), "--split", "val", "--step", "0"]


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = launch.main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and [line for line in lines if "error:" in line] == [lines[-1]], err
    return lines[-1]


def test_other_class_names_are_refused_with_the_differences(run: Path, tmp_path: Path, capsys) -> None:
    other = folder_dataset(tmp_path / "other", ("background", "cat", "bird"))
    err = error_line(capsys, evaluate(run, other))
    assert err.startswith(f"error: folder/val at {other} does not have the classes run {run} was trained with")
    assert "(read from its training data " in err and "class 2 is 'bird', the run's 'dog'" in err


def test_another_class_count_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    more = folder_dataset(tmp_path / "more", ("background", "cat", "dog", "bird"))
    err = error_line(capsys, evaluate(run, more))
    assert "K=3 classes, the run's K=2; class 3 is 'bird', the run's None" in err


def test_without_the_cache_the_run_dataset_class_list_is_used(run: Path, tmp_path: Path, capsys) -> None:
    shutil.rmtree(tmp_path / "outputs" / "datasets")
    other = folder_dataset(tmp_path / "other", ("background", "dog", "cat"))
    err = error_line(capsys, evaluate(run, other))
    assert f"(read from its dataset folder at {tmp_path / 'trained-on'})" in err
    assert "class 1 is 'dog', the run's 'cat'; class 2 is 'cat', the run's 'dog'" in err


def test_the_same_classes_are_scored(run: Path, tmp_path: Path, capsys) -> None:
    same = folder_dataset(tmp_path / "same", TRAINED)
    assert launch.main(evaluate(run, same)) == 0
    assert "step 0 on folder/val: mIoU all" in capsys.readouterr().out


def test_where_the_run_classes_cannot_be_read_it_warns_and_scores(
    run: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(tmp_path / "outputs" / "datasets")
    shutil.rmtree(tmp_path / "trained-on")
    same = folder_dataset(tmp_path / "same", TRAINED)
    with caplog.at_level(logging.WARNING):
        assert launch.main(evaluate(run, same)) == 0
    assert "cannot read the class names" in caplog.text and "they are not compared" in caplog.text


def test_label_space_differences_lists_count_then_ids() -> None:
    assert label_space_differences(TRAINED, TRAINED) == []
    assert label_space_differences(TRAINED, ("background", "cat")) == [
        "K=1 classes, the run's K=2",
        "class 2 is None, the run's 'dog'",
    ]
