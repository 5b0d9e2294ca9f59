"""What a run prints: one line per epoch and the step tables, no Ray chatter; EIR_VERBOSE=1 brings Ray's logs back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.synthetic_num_images=40", "dataset.synthetic_image_size=48", "task.name=15-5", "model.weights=null",
    "train.epochs=1", "train.epochs_incremental=2", "train.batch_size=8", "train.crop_size=48",
    "scaling.cpus_per_worker=1", "memory.size=30",
]  # fmt: skip
WORKER_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[^)]*)?\) ?")
EPOCH_LINE = re.compile(r"^\[step (\d+)\] epoch (\d+)/(\d+) loss ")
RUN_LINES_FROM_WORKERS = re.compile(r"^(\[step \d+\] |evaluate: )")  # the worker's own log lines and progress
# Ray's own warnings and errors, which stay: C++ `[date time E pid tid] file.cc:line` and Python `date time,ms WARNING`.
RAY_WARNING_OR_ERROR = re.compile(
    r"^(\[\d{4}-\d\d-\d\d [\d:,]+ [EWF] \d+ \d+\]|\d{4}-\d\d-\d\d [\d:,]+\s+(WARNING|ERROR))"
)
RAY_INFO = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+INFO ")  # Ray's Python log format on the driver
# What Ray printed on a quick start's console before it was quieted (one marker per kind of line).
CHATTER = (
    "Started a local Ray instance", "Token authentication is enabled", "Execution plan of Dataset",
    "Starting execution of Dataset", "execution finished in", "Progress bars disabled", "Requesting resources",
    "Started training worker group", "Setting up process group", "Moving model to device",
    "Reporting training result", "Checkpoint successfully created", "RayDeprecationWarning",
    "Exception in thread PlacementGroupCleanerMonitor",
)  # fmt: skip


def _console(tmp_path: Path, name: str, overrides: list[str], verbose: bool) -> list[str]:
    """A run's console as a terminal shows it: colour codes gone, each line as its last carriage return left it."""
    # As a user's shell has it: not the variables earlier tests in this process set (RAY_DATA_LOG_LEVEL is how
    # the quiet console reaches Ray Data's workers).
    inherited = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "EIR_VERBOSE", "RAY_DATA_LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env |= {"EIR_RAY_NUM_CPUS": "4", **({"EIR_VERBOSE": "1"} if verbose else {})}
    command = [sys.executable, str(REPO / "launch.py"), "run", str(REPO / "experiments" / "quickstart.yaml"), *TINY,
               *overrides, f"run.output_dir={tmp_path}", f"run.name={name}"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=900, check=False)
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, text[-4000:]
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).split("\r")[-1] for line in text.split("\n")]
    return [line for line in lines if line.strip()]


def _ray_chatter(lines: list[str]) -> list[str]:
    """Ray's lines that are neither the run's own nor one of Ray's warnings and errors (known notices included)."""
    chatter = []
    for line in lines:
        body = WORKER_PREFIX.sub("", line)
        kept = RAY_WARNING_OR_ERROR.match(body) or RUN_LINES_FROM_WORKERS.match(body)
        if any(marker in body for marker in CHATTER) or (not kept and (body != line or RAY_INFO.match(body))):
            chatter.append(line)
    return chatter


def test_a_run_prints_one_line_per_epoch_and_no_ray_chatter(tmp_path: Path) -> None:
    lines = _console(tmp_path, "quiet", ["method.name=eir"], verbose=False)
    assert _ray_chatter(lines) == [], "\n".join(lines)
    epochs = [EPOCH_LINE.match(WORKER_PREFIX.sub("", line)) for line in lines]
    assert sorted((int(m[1]), int(m[2])) for m in epochs if m) == [(0, 1), (1, 1), (1, 2)], "\n".join(lines)
    assert sum(line.startswith("step     all") for line in lines) == 2, "a results table after each step"


def test_eir_verbose_brings_ray_logs_back(tmp_path: Path) -> None:
    lines = _console(tmp_path, "verbose", ["method.name=joint"], verbose=True)
    shown = "\n".join(_ray_chatter(lines))
    for marker in ("Started a local Ray instance", "Execution plan of Dataset", "Started training worker group"):
        assert marker in shown, "\n".join(lines)
