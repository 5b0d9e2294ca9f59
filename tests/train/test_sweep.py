"""Sweeps: validation of sweep files, resource arithmetic, and real Tune sweeps on the shared Ray.

The main sweep logs to a real `mlflow server` over HTTP; the resume test interrupts a sweep run
in a subprocess and restores it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from eir.config import ConfigError, load_config
from eir.report import write_report
from eir.train.sweep import default_concurrency, load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "sweeps" / "synthetic_tiny.yaml"


def write_sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text.replace("BASE", str(REPO / "experiments" / "quickstart.yaml")))
    return path


def test_unknown_sweep_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schedular"):
        load_sweep(write_sweep(tmp_path, "name: s\nbase: BASE\nspace: {}\nschedular: asha\n"))


def test_space_key_must_be_a_config_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="memory.sise"):
        load_sweep(write_sweep(tmp_path, "name: s\nbase: BASE\nspace:\n  memory.sise: {grid: [1, 2]}\n"))


def test_bad_distribution_and_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="grid"):
        load_sweep(write_sweep(tmp_path, "name: s\nbase: BASE\nspace:\n  memory.size: {normal: [1, 2]}\n"))
    with pytest.raises(ConfigError, match="memory.size"):
        load_sweep(write_sweep(tmp_path, "name: s\nbase: BASE\nspace:\n  memory.size: {grid: [-5]}\n"))
    with pytest.raises(ConfigError, match="metric"):
        load_sweep(write_sweep(tmp_path, "name: s\nbase: BASE\nspace: {}\nmetric: accuracy\n"))


def test_default_concurrency_leaves_room_for_every_trainer() -> None:
    config = load_config(overrides=["scaling.num_workers=2", "scaling.cpus_per_worker=2", "train.batch_size=8"])
    # one trial: 2 workers x 2 CPUs + 1 data CPU = 5
    assert default_concurrency(config, {"CPU": 16}) == 3
    assert default_concurrency(config, {"CPU": 4}) == 1
    gpu = load_config(overrides=["scaling.num_workers=2", "scaling.use_gpu=true", "train.batch_size=8"])
    assert default_concurrency(gpu, {"CPU": 64, "GPU": 4}) == 2
    # a private local Ray counts more logical CPUs than cores: the cores decide
    assert default_concurrency(config, {"CPU": 16}, cores=10) == 2
    assert default_concurrency(config, {"CPU": 8}, cores=2) == 1
    assert default_concurrency(config, {"CPU": 8}, cores=64) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real tracking server on 127.0.0.1 with a sqlite backend and an artifact root, stopped afterwards.

    Start-up is slow on a loaded 2-core machine (measured: 9 s idle, 72 s beside a training run), so
    the wait is generous but ends at once if the server exits, showing its log.
    """
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log_path = folder / "server.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
             "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with code {process.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"mlflow server did not start within 240 s:\n{log_path.read_text()[-2000:]}")
    yield uri
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: stop it for sure
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_sweep_against_a_tracking_server(ray_session, mlflow_server: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # A relative output dir, as users write it: trials run in their own working directories, so it
    # must mean this directory for all of them (one dataset, one step-0 cache).
    monkeypatch.chdir(tmp_path)
    summary = run_sweep(TINY, ["run.output_dir=runs"])
    assert len(summary["trials"]) == 2 and not summary["failed"]
    assert summary["step0_trained"] == 1 and summary["step0_reused"] == 1, "step 0 is trained once per sweep"
    assert len(list((tmp_path / "runs" / "cache" / "step0").glob("*/key.json"))) == 1
    assert {t["params"]["memory.size"] for t in summary["trials"]} == {10, 30}
    assert 0 < max(t["time_total_s"] for t in summary["trials"]) <= summary["wall_s"]
    for trial in summary["trials"]:
        results = json.loads((Path(trial["run_dir"]) / "results.json").read_text())
        assert results["status"] == "finished"
        assert trial["metric"] == pytest.approx(results["steps"][-1]["hIoU"])

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["eir-sweep-synthetic_tiny"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == "synthetic_tiny")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    for trial in trials:
        steps = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert sorted(r.info.run_name for r in steps) == ["step_0", "step_1"]
        assert "memory.size" in trial.data.params and "final_hIoU" in trial.data.metrics
    assert "best_hIoU" in parent.data.metrics
    step1 = next(r for r in runs if r.info.run_name == "step_1")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(step1.info.run_id)}
    assert "confusion.png" in artifacts, "artifacts arrive through the server"

    out = tmp_path / "report"
    files = write_report([summary["dir"].replace("file://", "")], str(out))
    text = (out / "report.md").read_text()
    for trial in summary["trials"]:
        results = json.loads((Path(trial["run_dir"]) / "results.json").read_text())
        assert f"{results['steps'][-1]['mIoU_all']:.2f}" in text
    assert any(name.endswith("_vs_memory.size.png") for name in files)
    assert (out / "miou_per_step.png").is_file()


@pytest.mark.slow
def test_resume_finishes_an_interrupted_sweep(ray_session, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, "EIR_RAY_NUM_CPUS": "4"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), "sweep", str(TINY), f"run.output_dir={tmp_path}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    runs = tmp_path / "sweeps" / "synthetic_tiny" / "runs"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # interrupt once the first trial has finished
            finished = [p for p in runs.glob("*/results.json") if json.loads(p.read_text())["status"] == "finished"]
            if finished:
                break
            if process.poll() is not None:
                pytest.fail(f"the sweep ended (exit code {process.returncode}) before any trial finished")
            time.sleep(2)
        else:
            pytest.fail("no trial finished within 600 s")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    trained = finished[0].parent / "step_1" / "model.pt"
    before = trained.stat().st_mtime_ns
    summary = run_sweep(TINY, [f"run.output_dir={tmp_path}"], resume=True)
    assert len(summary["trials"]) == 2 and not summary["failed"]
    assert all(t["status"] == "finished" for t in summary["trials"])
    assert trained.stat().st_mtime_ns == before, "the trial finished before the interruption is not trained again"
