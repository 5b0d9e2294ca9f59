"""The command line as a user types it: help texts, dry runs, and errors that name the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


COMMANDS = ["prepare", "run", "evaluate", "preview", "pseudo-labels", "sweep", "report", "submit", "bench", "cache"]


def test_help_lists_every_command() -> None:
    result = launch("--help")  # once as a user runs it, in a process of its own
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert f"\n    {command} " in result.stdout or f"\n    {command}\n" in result.stdout, command


@pytest.mark.parametrize(
    ("command", "explains"),
    [
        ("prepare", ["--root", "--split", "--out", "--overwrite", "--num-images"]),
        ("run", ["--resume", "--dry-run", "key=value", "results.json"]),
        ("evaluate", ["--dataset", "--root", "--split", "--step", "--out"]),
        ("preview", ["--step", "--out", "pseudo-label"]),
        ("pseudo-labels", ["--out", "--plot", "recall"]),
        ("sweep", ["--resume", "space", "Tuner.restore", "Compare"]),
        ("report", ["--out", "report.md"]),
        ("submit", ["--address", "--no-wait", "RAY_AUTH_TOKEN"]),
        ("bench", ["accuracy_camvid", "memory_store", "--quick"]),
        ("cache", ["--list", "--clear", "cache/step0"]),
    ],
)
def test_help_explains_each_command(command: str, explains: list[str], capsys) -> None:
    import launch as cli  # in-process: the same parser, without a Python start per command

    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: launch.py {command} ")
    for fragment in explains:
        assert fragment in out, fragment


def test_run_help_lists_every_config_key() -> None:
    out = launch("run", "--help").stdout
    for key in (
        "dataset.root",
        "task.name",
        "method.name",
        "train.epochs_incremental",
        "eval.protocol",
        "scaling.num_workers",
    ):
        assert key in out


def test_dry_run_prints_the_step_table(tmp_path: Path) -> None:
    result = launch(
        "run",
        str(REPO / "experiments" / "quickstart.yaml"),
        "--dry-run",
        f"run.output_dir={tmp_path}",
        "dataset.synthetic_num_images=40",
        "dataset.synthetic_image_size=48",
    )
    assert result.returncode == 0, result.stderr
    assert "train imgs" in result.stdout and "task:" in result.stdout
    assert not (tmp_path / "quickstart").exists()


def test_unknown_key_suggests_close_ones(tmp_path: Path) -> None:
    result = launch("run", str(REPO / "experiments" / "quickstart.yaml"), "--dry-run", "train.epoch=3")
    assert result.returncode == 2
    assert "train.epoch" in result.stderr and "train.epochs" in result.stderr


def test_bad_value_names_allowed_values() -> None:
    result = launch("run", str(REPO / "experiments" / "quickstart.yaml"), "--dry-run", "method.name=magic")
    assert result.returncode == 2
    assert "method.name" in result.stderr and "finetune" in result.stderr


def test_overrides_may_follow_flags(tmp_path: Path) -> None:
    result = launch(
        "run",
        str(REPO / "experiments" / "quickstart.yaml"),
        "--dry-run",
        f"run.output_dir={tmp_path}",
        "dataset.synthetic_num_images=40",
        "dataset.synthetic_image_size=48",
        "task.name=15-5",
    )
    assert result.returncode == 0, result.stderr
    assert "15-5" in result.stdout


@pytest.mark.parametrize("config", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_config_loads(config: Path) -> None:
    from eir.config import load_config

    loaded = load_config(config)
    assert loaded.train.batch_size % loaded.scaling.num_workers == 0


def test_ctrl_c_is_error_interrupted_with_exit_130(tmp_path: Path, capsys, monkeypatch) -> None:
    import launch as cli

    def interrupted(paths, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_report", interrupted)
    assert cli.main(["report", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_machine_errors_keep_their_traceback_only_under_verbose(tmp_path: Path, capsys, monkeypatch) -> None:
    import errno
    import os

    import launch as cli

    def disk_full(paths, out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "report.md"))

    monkeypatch.setattr(cli, "write_report", disk_full)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'out' / 'report.md'}: No space left on device\n"
    monkeypatch.setenv("EIR_VERBOSE", "0")  # -v sets it for Ray; restored after the test
    assert cli.main(["-v", "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(f"error: {tmp_path / 'out' / 'report.md'}: No space left on device\n")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(28, "No space left on device", "/d/x"), "/d/x: No space left on device"),
        (OSError(18, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
        (OSError(30, "Read-only file system"), "Read-only file system"),
        (
            OSError("Cannot create directory '/r/x'.\nDetail: [errno 13] Permission denied"),
            "Cannot create directory '/r/x'. Detail: [errno 13] Permission denied",
        ),
        (
            FileExistsError("run directory /r/x already exists: pass --resume"),
            "run directory /r/x already exists: pass --resume",
        ),
    ],
)
def test_errors_are_described_in_one_line(error: BaseException, line: str) -> None:
    from launch import describe_error

    assert describe_error(error) == line


def test_an_os_error_from_a_ray_task_is_described_by_its_cause() -> None:
    from launch import describe_error

    class RemoteOSError(OSError):  # what Ray raises for a task that failed with an OSError: both types at once
        def __init__(self, cause: OSError):
            super().__init__("ray::task() (pid=1)\nTraceback (most recent call last):\n  ...\n" + str(cause))
            self.cause = cause

    assert (
        describe_error(RemoteOSError(OSError(28, "No space left on device", "/d/x"))) == "/d/x: No space left on device"
    )
