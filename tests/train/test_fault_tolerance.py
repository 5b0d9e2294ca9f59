"""Fault tolerance for real: a Ray Train worker that dies mid-epoch, a driver killed between and during steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from eir.config import load_config
from eir.train.experiment import run_experiment

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "dataset.synthetic_num_images=40",
    "dataset.synthetic_image_size=48",
    "task.name=15-5",
    "model.weights=null",
    "train.epochs=1",
    "train.epochs_incremental=2",
    "train.batch_size=8",
    "train.crop_size=48",
    "scaling.cpus_per_worker=1",
]
# EIR in the driver-kill tests: its step 0 leaves an instance store and step 1 stores pseudo-labels,
# both of which a resumed run must reuse.
EIR = [
    "method.name=eir",
    "memory.size=30",
    "train.lr_incremental=0.001",
]  # EIR diverges at 0.005 on synthetic (BENCHMARKS.md)
RESULTS_KEYS = {
    "status",
    "method",
    "dataset",
    "task",
    "task_setting",
    "seed",
    "eval_protocol",
    "git_sha",
    "mean_mIoU_all_over_steps",
    "steps",
}
STEP_KEYS = {
    "step",
    "seen_classes",
    "mIoU_all",
    "mIoU_old",
    "mIoU_new",
    "hIoU",
    "mIoU_all_fg",
    "mIoU_old_fg",
    "per_class_IoU",
}

# The killed-vs-unkilled comparison. Ray Data's augmentation draws fresh randomness in every run (it
# is not bit-reproducible), and an epoch here is 4 iterations, so one epoch's mean loss moves by
# ±40 % between two unkilled runs (measured: epoch 2 at 2.23 and 1.44) and this tiny joint run ends
# at the same background-only map killed or not (5.78 mIoU both). What does discriminate is where
# the restarted epoch starts: continued from the epoch-2 checkpoint its loss is about half the first
# epoch's (measured 1.9–2.5 vs 4.9–5.0), while a group that took the epoch count but not the weights
# would be back at the first epoch's level. `checkpoint_resumes` (counted from the checkpoint itself)
# checks that the restart read the checkpoint at all.
CONTINUED = 0.7  # the last epoch's loss is below this share of the first epoch's
MIOU_TOLERANCE = 15.0  # points: a sanity bound on the final scores, not the proof of the restart


def _epoch_losses(output_dir: Path, run_name: str) -> list[float]:
    """The per-epoch training loss of the run's only step, as MLflow recorded it."""
    mlflow.set_tracking_uri(f"sqlite:///{output_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eir-synthetic-15-5"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == run_name)
    (step,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    history = mlflow.MlflowClient().get_metric_history(step.info.run_id, "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(ray_session, tmp_path: Path, monkeypatch) -> None:
    # joint: one Train run per experiment keeps the two runs short
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = [*TINY, f"run.output_dir={tmp_path}", "train.max_failures=1", "method.name=joint"]
    clean = run_experiment(
        load_config(REPO / "experiments" / "quickstart.yaml", [*base, "run.name=clean", "train.epochs=3"]),
        progress=False,
    )
    marker = tmp_path / "worker-killed"
    monkeypatch.setenv("EIR_FAIL_AT_ITERATION", "9")  # 32 images / batch 8 = 4 iterations per epoch: epoch 3
    monkeypatch.setenv("EIR_FAULT_MARKER", str(marker))
    killed = run_experiment(
        load_config(REPO / "experiments" / "quickstart.yaml", [*base, "run.name=killed", "train.epochs=3"]),
        progress=False,
    )
    assert marker.exists(), "the worker really exited"
    assert killed["status"] == "finished"
    assert killed["steps"][0]["checkpoint_resumes"] == 1
    assert clean["steps"][0]["checkpoint_resumes"] == 0
    clean_loss, killed_loss = _epoch_losses(tmp_path, "clean"), _epoch_losses(tmp_path, "killed")
    print(f"epoch losses unkilled {clean_loss}, killed at iteration 9 and restarted {killed_loss}")  # shown with -s
    print(f"mIoU_all unkilled {clean['steps'][0]['mIoU_all']:.2f}, killed {killed['steps'][0]['mIoU_all']:.2f}")
    assert len(clean_loss) == len(killed_loss) == 3, "every epoch reported once, the restarted one included"
    assert clean_loss[-1] < CONTINUED * clean_loss[0]
    assert killed_loss[-1] < CONTINUED * clean_loss[0], "the restarted epoch continued from the checkpoint's weights"
    assert abs(clean["steps"][0]["mIoU_all"] - killed["steps"][0]["mIoU_all"]) <= MIOU_TOLERANCE


LAUNCH_LOG = "launch.log"  # the killed run's console output, beside its outputs


def _launch(tmp_path: Path, *extra: str) -> subprocess.Popen:
    """The run in its own process group; its console output goes to `LAUNCH_LOG`, which a failure quotes."""
    with (tmp_path / LAUNCH_LOG).open("w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch.py"),
                "run",
                str(REPO / "experiments" / "quickstart.yaml"),
                *TINY,
                f"run.output_dir={tmp_path}",
                "run.name=interrupted",
                *extra,
            ],
            cwd=REPO,
            env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "EIR_RAY_NUM_CPUS": "4"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_when(process: subprocess.Popen, condition, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if condition():
                return
            if process.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                pytest.fail(f"the run ended (exit {process.returncode}) before the kill point:\n" + "\n".join(tail))
            time.sleep(1)
        pytest.fail("the kill point was not reached")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _registered_checkpoint(step_dir: Path) -> bool:
    """Whether Ray Train has *registered* an epoch checkpoint, not just written its files.

    A checkpoint's files land in storage before the Train controller records them in its snapshot
    (`checkpoint_manager_snapshot.json`); a driver killed in between leaves files that a resumed run
    rightly ignores. Killing on the files alone made this test a race that a busy CI machine lost.
    """
    for snapshot in step_dir.rglob("checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (json.JSONDecodeError, OSError):  # caught mid-write: look again next second
            continue
    return False


@pytest.mark.parametrize("kill_point", ["between_steps", "during_step"])
def test_driver_killed_then_resumed(ray_session, tmp_path: Path, kill_point: str, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "interrupted"
    if kill_point == "between_steps":
        condition = (run / "step_0" / "_COMPLETE").exists
    else:  # Ray Train has registered an epoch checkpoint of step 1, the step is not finished
        condition = lambda: _registered_checkpoint(run / "step_1")  # noqa: E731
    _kill_when(_launch(tmp_path, *EIR), condition, tmp_path / LAUNCH_LOG)
    assert not (run / "results.json").exists() or json.loads((run / "results.json").read_text())["status"] != "finished"
    # What a finished step (and an unfinished step's finished phases) left must be reused, not redone.
    reused = [run / "step_0" / "model.pt", run / "step_0" / "instances.parquet"]
    if kill_point == "during_step":
        reused.append(run / "step_1" / "pseudo" / "_COMPLETE")
    before = {path: path.stat().st_mtime_ns for path in reused}

    resumed = run_experiment(
        load_config(
            REPO / "experiments" / "quickstart.yaml",
            [*TINY, *EIR, f"run.output_dir={tmp_path}", "run.name=interrupted"],
        ),
        resume=True,
        progress=False,
    )
    assert resumed["status"] == "finished" and len(resumed["steps"]) == 2
    assert {path: path.stat().st_mtime_ns for path in reused} == before, "finished work is reused, not redone"
    if kill_point == "during_step":
        assert resumed["steps"][1]["checkpoint_resumes"] == 1, "step 1 continued from its epoch checkpoint"
    assert set(resumed) >= RESULTS_KEYS and set(resumed["steps"][0]) == set(resumed["steps"][1]) >= STEP_KEYS
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eir-synthetic-15-5"], output_format="list")
    parents = [r for r in runs if r.info.run_name == "interrupted"]
    assert len(parents) == 1, "the MLflow run is resumed, not duplicated"
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id)
    assert children == ["interrupted/step_0", "interrupted/step_1"], "each step's MLflow run is resumed, not duplicated"


def test_ctrl_c_during_a_step_is_recorded_as_interrupted(tmp_path: Path) -> None:
    """What a user's Ctrl-C does: Ray Train aborts the step, the run says `interrupted`, MLflow says KILLED."""
    log = tmp_path / "console.txt"
    with open(log, "w") as console:
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch.py"),
                "run",
                str(REPO / "experiments" / "quickstart.yaml"),
                *TINY,
                "method.name=finetune",
                "train.epochs=30",
                f"run.output_dir={tmp_path}",
                "run.name=interrupted",
            ],
            cwd=REPO,
            env={
                **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
                "EIR_RAY_NUM_CPUS": "4",
            },
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 600
            while not _registered_checkpoint(tmp_path / "interrupted" / "step_0"):
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "no epoch checkpoint within 10 minutes"
                time.sleep(1)
            os.kill(process.pid, signal.SIGINT)  # the driver only, as Ray Train's handler expects
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    output = log.read_text()
    assert code == 130 and "error: interrupted" in output, output[-3000:]
    results = json.loads((tmp_path / "interrupted" / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"].startswith("KeyboardInterrupt"), results
    assert "Reporting training result" not in output, "Ray Train's per-report lines stay off the console"
    assert not (tmp_path / "interrupted" / "_LOCK").exists(), "the lock is released"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eir-synthetic-15-5"], output_format="list")
    assert {r.info.run_name: r.info.status for r in runs} == {"interrupted": "KILLED", "interrupted/step_0": "KILLED"}
