"""Bad input as a user meets it: at `launch.py`, with the message they read and nothing half-written.

The readers, the task logic and the config each test their own errors in detail (tests/data,
test_tasks.py, test_config.py, tests/replay); this module drives the same mistakes through the
command line, so each one is known to reach the user as one clear line (exit code 2, no
traceback) naming the file, key or value and what was expected. A one-class step without a
NaN anywhere needs a real run: tests/test_multinode.py (task 19-1).
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import warnings
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import numpy as np
import pytest
import torch
from PIL import Image

import launch
from eir import storage
from eir.config import dump_yaml, load_config, schema, valid_keys
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
    err = fails(
        capsys,
        "run",
        QUICKSTART,
        "--dry-run",
        f"run.output_dir={tmp_path / 'runs'}",
        "dataset.name=folder",
        f"dataset.root={root}",
        "dataset.test_split=train",
        "task.name=2-1",
    )
    assert "step 1 (classes [3]) has 0 training images" in err


def test_memory_size_zero_warns_and_larger_than_the_candidates_is_covered_by_the_stores() -> None:
    with pytest.warns(UserWarning, match=r"memory.size=0 with method 'eir': nothing is stored"):
        load_config(QUICKSTART, ["method.name=eir", "memory.size=0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(QUICKSTART, ["method.name=finetune", "memory.size=0"])  # no memory: nothing to warn about
    # memory.size larger than the candidates: tests/replay/test_store.py and test_image_store.py
    # assert "memory.size=200 but only 7 instances were found; stored 7".


@pytest.mark.parametrize("rule", ["skip", "skip_old_argmax"])
def test_skipping_the_old_classes_bce_without_a_distillation_that_covers_them_warns(rule: str) -> None:
    for overrides, held in [
        (["method.name=eir"], r"RSKD only on new-class pixels \(loss.rskd_region=new_gt\)"),
        (["method.name=eir_no_rskd"], "no distillation"),
    ]:
        with pytest.warns(UserWarning, match=rf"loss.bce_old_background={rule} with {held} .*nothing trains the old"):
            load_config(QUICKSTART, [*overrides, f"loss.bce_old_background={rule}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for region in ("all", "complement"):
            overrides = ["method.name=eir", f"loss.bce_old_background={rule}", f"loss.rskd_region={region}"]
            load_config(QUICKSTART, overrides)
        load_config(QUICKSTART, ["method.name=mib"])  # a method that does not read the key: nothing to warn about


def test_a_checkpoint_from_another_task_is_refused_by_evaluate(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "synthetic"
    generate_synthetic(raw, 12, seed=0, image_size=32, progress=False)
    config = load_config(
        QUICKSTART, [f"run.output_dir={tmp_path}", "run.name=r", "task.name=15-5", "model.weights=null"]
    )
    run = tmp_path / "r"
    (run / "step_0").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(config))
    foreign = build_model("mobilenet_v2", [10], weights=None)  # a 10-5 task's step 0, not 15-5's
    buffer = io.BytesIO()
    torch.save({"model": foreign.state_dict(), "head_sizes": [10]}, buffer)
    (run / "step_0" / "model.pt").write_bytes(buffer.getvalue())
    storage.mark_complete(storage.resolve(run / "step_0"))
    err = fails(
        capsys, "evaluate", str(run), "--dataset", "synthetic", "--root", str(raw), "--split", "val", "--step", "0"
    )
    assert "model.pt" in err and "[10]" in err and "[15]" in err and "different task" in err


# ---------------------------------------------------------------- every setting checked before anything runs (issue 17)

SWEEP_BASE = f"base: {QUICKSTART}\n"


def one_error_line(err: str) -> str:
    """The command's stderr must be exactly one `error:` line (logging may precede it); that line."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.nan", "error: bad value nan for train.lr: expected a finite number"),
        ("train.lr=.inf", "error: bad value inf for train.lr: expected a finite number"),
        ("loss.bce_weight=.nan", "error: bad value nan for loss.bce_weight: expected a finite number"),
        (
            "train.checkpoints_to_keep=0",
            "error: bad value 0 for train.checkpoints_to_keep: expected a positive integer",
        ),
        ("train.max_failures=-1", "error: bad value -1 for train.max_failures: expected 0 or more"),
        ("train.momentum=-0.9", "error: bad value -0.9 for train.momentum: expected 0 < momentum < 1 (Nesterov SGD)"),
        ("train.weight_decay=-1e-4", "error: bad value -0.0001 for train.weight_decay: expected a number >= 0"),
        (
            "scaling.cpus_per_worker=0",
            "error: bad value 0.0 for scaling.cpus_per_worker: expected a CPU count > 0 (fractions allowed)",
        ),
        ("seed=-1", "error: bad value -1 for seed: expected a seed in [0, 2**32)"),
        (
            "run.name=..",
            "error: bad value '..' for run.name: it would not name a folder of its own; expected one folder name",
        ),
        (
            "run.name=../escape",
            "error: bad value '../escape' for run.name: it contains a path separator; expected one folder name",
        ),
        # Accepted before issue 18, then failing later (after step 0 had trained, or with a traceback):
        ("paste.max_instances=1", "error: bad value 1 for paste.max_instances: expected 2..4 (at least the 2 classes"),
        ("paste.max_instances=5", "error: bad value 5 for paste.max_instances: expected 2..4 (at least the 2 classes"),
        (
            "train.batch_size=1",
            "error: train.batch_size=1 gives each of the scaling.num_workers=1 Train worker(s) 1 image "
            "per batch: step 0 trains BatchNorm, whose image-pooling branch needs at least 2",
        ),
        (
            "dataset.synthetic_image_size=16",
            "error: bad value 16 for dataset.synthetic_image_size: expected at least 32",
        ),
        ("dataset.synthetic_num_images=1", "error: bad value 1 for dataset.synthetic_num_images: expected at least 2"),
        ("dataset.train_split=", "error: bad value '' for dataset.train_split: expected a split name"),
        ("dataset.test_split=../val", "error: bad value '../val' for dataset.test_split: expected a split name"),
        (
            "task.class_order=[1,1,2]",
            "error: bad value [1, 1, 2] for task.class_order: expected null or a list of distinct",
        ),
    ],
)
def test_bad_settings_fail_before_anything_is_written(override: str, message: str, tmp_path: Path, capsys) -> None:
    err = fails(capsys, "run", QUICKSTART, "--dry-run", f"run.output_dir={tmp_path / 'out'}", override)
    assert one_error_line(err).startswith(message)
    assert not (tmp_path / "out").exists() and written_files(tmp_path) == []


def test_a_missing_weights_file_fails_at_load_naming_key_and_path(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "gone" / "mnv2.pth"
    err = fails(
        capsys, "run", QUICKSTART, "--dry-run", f"run.output_dir={tmp_path / 'out'}", f"model.weights={weights}"
    )
    assert one_error_line(err).startswith(
        f"error: bad value '{weights}' for model.weights: no such file {weights}; expected 'imagenet', null"
    )
    weights.parent.mkdir()
    err = fails(
        capsys, "run", QUICKSTART, "--dry-run", f"run.output_dir={tmp_path / 'out'}", f"model.weights={weights.parent}"
    )
    assert f"for model.weights: {weights.parent} is a folder" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_duplicated_section_in_a_config_file_is_an_error(tmp_path: Path, capsys) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(f"inherit: {QUICKSTART}\ntrain:\n  epochs: 1\nseed: 2\ntrain:\n  lr: 0.5\n")
    err = fails(capsys, "run", str(config), "--dry-run", f"run.output_dir={tmp_path / 'out'}")
    assert one_error_line(err) == (
        f"error: config file {config} is not valid YAML: key 'train' is given twice, at lines 2 and 5 "
        "(the second would silently replace the first; merge them)"
    )


def test_a_non_utf8_config_file_is_one_error(tmp_path: Path, capsys) -> None:
    config = tmp_path / "exp.yaml"
    config.write_bytes(f"inherit: {QUICKSTART}\n# d\xe9j\xe0 vu\n".encode("latin-1"))
    err = fails(capsys, "run", str(config), "--dry-run", f"run.output_dir={tmp_path / 'out'}")
    assert (
        one_error_line(err)
        == f"error: config file {config} is not UTF-8 text (line 2 has the byte 0xe9): save it as UTF-8"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "name: ../../x\nspace: {seed: {grid: [0, 1]}}\n",
            "bad value '../../x' for name in {sweep}: it contains a path separator",
        ),
        (
            "name: s\nspace: {train.epochs: {grid: [1, -5]}}\n",
            "sweep file {sweep}, trial train.epochs=-5: bad value -5 for train.epochs: expected a positive integer",
        ),
        ("name: s\nspace: {}\n", "space in {sweep} is empty"),
        (
            "name: s\nspace: {seed: {grid: [0, 1]}}\nmax_concurrent_trials: -1\n",
            "bad value -1 for max_concurrent_trials in {sweep}",
        ),
        ("name: s\nspace: {seed: {grid: [0, 1]}}\nnum_samples: abc\n", "bad value 'abc' for num_samples in {sweep}"),
        ("name: s\nspace: {seed: {grid: [0, 1]\n", "sweep file {sweep} is not valid YAML: "),
        (
            "name: s\nspace: {seed: {grid: [0, 1]}}\nname: t\n",
            "sweep file {sweep} is not valid YAML: key 'name' is given twice",
        ),
        ("name: s\nspace: {seed: {grid: [0, 1]}}\nschedular: asha\n", "unknown sweep key(s) ['schedular'] in {sweep}"),
    ],
)
def test_bad_sweeps_fail_before_anything_is_written(body: str, message: str, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "deep" / "er" / "sweep.yaml"
    sweep.parent.mkdir(parents=True)
    sweep.write_text(SWEEP_BASE + body)
    err = fails(capsys, "sweep", str(sweep), f"run.output_dir={tmp_path / 'out'}")
    assert message.format(sweep=sweep) in one_error_line(err)
    assert written_files(tmp_path) == [sweep], "nothing is written (a name of ../../x would land outside sweeps/)"


def test_ray_that_cannot_start_is_one_error_and_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process, whatever this one started
    sweep = REPO / "experiments" / "sweeps" / "synthetic_tiny.yaml"
    err = fails(capsys, "sweep", str(sweep), f"run.output_dir={tmp_path / 'out'}")
    assert one_error_line(err).startswith(
        f"error: Ray could not start (the cluster at RAY_ADDRESS=127.0.0.1:{port}): "
        f"nothing answers at 127.0.0.1:{port} (Connection refused)"
    )
    assert not (tmp_path / "out").exists()


def _finished_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    steps = [{"step": 0, "mIoU_all": 50.0, "mIoU_old": 50.0, "mIoU_new": None, "hIoU": None}]
    (folder / "results.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "dataset": "synthetic",
                "task": "10-5",
                "task_setting": "overlapped",
                "method": "eir",
                "steps": steps,
            }
        )
    )
    return folder / "results.json"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"status": "fini', "(not JSON: Unterminated string starting at: line 1 column 12 (char 11))"),
        (b"\xff\xfe", "(not JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
        (b"[1, 2]", "(expected a JSON object, got list)"),
        (b'{"status": "finished", "steps": []}', "(a finished run without dataset, task, task_setting, method)"),
        (
            (
                b'{"status": "finished", "dataset": "d", "task": "t", "task_setting": "s", "method": "m", '
                b'"steps": [{"mIoU_all": 1}]}'
            ),
            "(a finished run without hIoU, mIoU_new, mIoU_old)",
        ),
    ],
)
def test_report_refuses_a_damaged_results_file_among_good_ones(
    content: bytes, problem: str, tmp_path: Path, capsys
) -> None:
    _finished_run(tmp_path / "runs" / "a")
    damaged = _finished_run(tmp_path / "runs" / "b")
    damaged.write_bytes(content)
    err = fails(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    assert one_error_line(err) == (
        f"error: {damaged} is damaged {problem}; restore it, or move its run folder out of the folders given to report"
    )
    assert not (tmp_path / "out").exists()


def test_report_on_a_missing_or_empty_folder_and_a_damaged_sweep_summary(tmp_path: Path, capsys) -> None:
    err = fails(capsys, "report", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert one_error_line(err) == (
        f"error: {tmp_path / 'nope'} does not exist "
        "(expected a run directory, a sweep directory, or a folder holding them)"
    )
    (tmp_path / "empty").mkdir()
    err = fails(capsys, "report", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert (
        one_error_line(err)
        == f"error: no finished run under {tmp_path / 'empty'} (no results.json with status 'finished')"
    )
    sweep = tmp_path / "sweep"
    _finished_run(sweep / "runs" / "t1")
    (sweep / "summary.json").write_text(
        json.dumps(
            {
                "sweep": "s",
                "metric": "hIoU",
                "trials": [{"trial_id": "t1"}],
                "failed": [],
                "step0_trained": 1,
                "step0_reused": 0,
            }
        )
    )
    err = fails(capsys, "report", str(sweep), "--out", str(tmp_path / "out"))
    assert one_error_line(err).startswith(
        f"error: {sweep / 'summary.json'} is damaged (a sweep summary without trials[].metric, trials[].params)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOTDIR])
def test_a_write_the_machine_refuses_is_one_line_naming_the_path(
    code: int, tmp_path: Path, capsys, monkeypatch
) -> None:
    import eir.report

    _finished_run(tmp_path / "runs" / "a")
    target = tmp_path / "out" / "report.md"

    def refuse(loc, data) -> None:
        raise OSError(code, os.strerror(code), loc.path)

    monkeypatch.setattr(eir.report.storage, "write_bytes_atomic", refuse)
    err = fails(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    assert one_error_line(err) == f"error: {target}: {os.strerror(code)}"


def test_an_output_dir_that_is_a_file_or_not_writable(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    err = fails(capsys, "report", str(tmp_path), "--out", str(tmp_path / "file"))  # tmp_path has no run: fails first
    assert one_error_line(err).startswith("error: no finished run under")
    _finished_run(tmp_path / "runs" / "a")
    err = fails(capsys, "report", str(tmp_path / "runs"), "--out", str(tmp_path / "file"))
    assert one_error_line(err) == f"error: {tmp_path / 'file'}: File exists"
    err = fails(
        capsys,
        "run",
        QUICKSTART,
        "--dry-run",
        f"run.output_dir={tmp_path / 'file'}",
        "dataset.synthetic_num_images=40",
        "dataset.synthetic_image_size=48",
    )
    assert one_error_line(err).startswith(f"error: {tmp_path / 'file'}/") and one_error_line(err).endswith(
        ": Not a directory"
    )
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here (a folder nobody, root included, can write into)")
    err = fails(
        capsys,
        "run",
        QUICKSTART,
        "--dry-run",
        "run.output_dir=/sys/eir-not-writable",
        "dataset.synthetic_num_images=40",
        "dataset.synthetic_image_size=48",
    )
    assert one_error_line(err).startswith("error: /sys/eir-not-writable")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--step", "1", "--count", "0"], "error: bad value 0 for --count: expected a number of samples >= 1"),
        (["--step", "1", "--count", "-3"], "error: bad value -3 for --count: expected a number of samples >= 1"),
        (
            ["--step", "0"],
            "error: bad value 0 for --step: expected an incremental step (1 or more; step 0 pastes nothing)",
        ),
        (["--step", "-1"], "error: bad value -1 for --step: expected an incremental step"),
    ],
)
def test_preview_arguments_are_checked_before_the_run_is_opened(
    flags: list[str], message: str, tmp_path: Path, capsys
) -> None:
    err = fails(capsys, "preview", str(tmp_path / "no-run"), "--out", str(tmp_path / "p.png"), *flags)
    assert one_error_line(err).startswith(message)


# ---------------------------------------------------------------- every key, one bad value at a time (issue 18)


def _wrong_type(annotation: Any) -> Any:
    """A value of the wrong type for a key: a string where a number, bool or choice is due, a list for text."""
    options = (
        [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType)
        else [annotation]
    )
    if get_origin(options[0]) is list:
        return "abc"
    return ["a"] if options[0] is str else "no-such-value"


BAD_VALUES = [
    pytest.param(entry.key, value, id=f"{entry.key}={value!r}")
    for entry in schema()
    for value in (_wrong_type(entry.annotation), *entry.knob.check.invalid)
]


def test_every_key_has_a_bad_value_to_try() -> None:
    assert {key for key, _ in (p.values for p in BAD_VALUES)} == set(valid_keys())


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_every_key_refuses_a_bad_value_at_load_and_writes_nothing(
    key: str, value: Any, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`launch.py run quickstart.yaml <key>=<bad> run.output_dir=<tmp>/out`: exit 2, one `error:` line
    naming the key, nothing under the output dir. Nothing may start: a value the schema lets through
    reaches `run_experiment`, which fails the test at once instead of training."""

    def accepted(config: Any, **_: Any) -> None:
        raise AssertionError(f"{key}={value!r} was accepted; the run would have started")

    monkeypatch.setattr(launch, "run_experiment", accepted)
    out = tmp_path / "out"
    overrides = (
        [f"{key}={json.dumps(value)}"]
        if key == "run.output_dir"
        else [f"run.output_dir={out}", f"{key}={json.dumps(value)}"]
    )
    line = one_error_line(fails(capsys, "run", QUICKSTART, *overrides))
    assert key in line, line
    assert not out.exists() or not any(out.iterdir())
