"""The tracking layer against real stores: where MLflow state goes, a dead server (a closed port on 127.0.0.1)
failing in seconds, and what a researcher reads in a sqlite store: names, description, source, params, statuses,
the per-class IoU table, resume."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.fs as pafs
import pytest
from local_services import free_port

from eir import storage
from eir.config import ConfigError, inactive_keys, load_config
from eir.tracking import (
    FAILED,
    FINISHED,
    IOU_TABLE,
    KILLED,
    MLFLOW_DEFAULTS,
    Tracker,
    TrackingError,
    artifact_location,
    check_reachable,
    load_run_ids,
    run_description,
    run_params,
    run_status,
    save_run_ids,
    set_mlflow_defaults,
    source_tags,
    step_run_name,
    tracking_uri,
)

REPO = Path(__file__).resolve().parents[1]


def remote_root(tmp_path: Path) -> storage.Location:
    return storage.resolve(
        str(tmp_path / "bucket"), filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    )


def test_local_root_keeps_database_and_artifacts_beside_the_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = storage.resolve(str(tmp_path))
    assert tracking_uri(root) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert artifact_location(tracking_uri(root), root) == f"file://{tmp_path / 'mlartifacts'}"


def test_remote_root_needs_a_tracking_uri(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="is remote: set MLFLOW_TRACKING_URI to a tracking server"):
        tracking_uri(remote_root(tmp_path))  # a ConfigError: one `error:` line from launch.py, not a traceback


def test_remote_root_with_sqlite_puts_artifacts_beside_the_database(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    assert artifact_location(uri, remote_root(tmp_path)) == f"file://{tmp_path / 'db' / 'mlartifacts'}"
    assert artifact_location("http://127.0.0.1:5000", remote_root(tmp_path)) is None


# ---------------------------------------------------------------- reaching the store


@pytest.fixture(autouse=True)
def _own_http_limits(monkeypatch) -> Iterator[None]:
    """Each test starts without MLflow's HTTP settings and leaves none behind (the Tracker sets them)."""
    saved = {name: os.environ.pop(name, None) for name in MLFLOW_DEFAULTS}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def test_a_dead_tracking_server_fails_in_seconds(tmp_path: Path, monkeypatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        Tracker(storage.resolve(str(tmp_path)), "eir-test")
    assert time.monotonic() - start < 5
    assert str(info.value) == (
        f"no MLflow tracking server answered at MLFLOW_TRACKING_URI={uri} (tried GET /health, connection refused): "
        "start the server, correct MLFLOW_TRACKING_URI, or unset it to log to a sqlite file in run.output_dir"
    )
    assert isinstance(info.value, ConfigError), "launch.py turns it into one `error:` line and exit 2"


def test_a_silent_server_and_a_password_in_the_uri(tmp_path: Path, monkeypatch) -> None:
    """A port that accepts but never answers: the probe gives up after its timeout; the password is never shown."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://me:hunter2@127.0.0.1:{port}")
        start = time.monotonic()
        with pytest.raises(
            TrackingError,
            match=rf"at MLFLOW_TRACKING_URI=http://me:\*\*\*@127.0.0.1:{port} "
            r"\(tried GET /health, timed out after 1s\)",
        ) as info:
            Tracker(storage.resolve(str(tmp_path)), "eir-test", probe_timeout=1)
        assert time.monotonic() - start < 5
        assert "hunter2" not in str(info.value)
    with pytest.raises(TrackingError, match="is not a usable URL"):
        check_reachable("http://127.0.0.1:port/")


@pytest.fixture
def short_lived_server() -> Iterator[tuple[str, Callable[[], None]]]:
    """An HTTP server that passes the health check and answers MLflow's experiment lookup, and a `stop()` that
    closes its port: a tracking server that dies after the Tracker was made."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/api/2.0/mlflow/experiments/get-by-name":
                body = json.dumps(
                    {"experiment": {"experiment_id": "1", "name": "eir-test", "lifecycle_stage": "active"}}
                )
            elif path == "/health":
                body = "OK"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stopped = []

    def stop() -> None:
        server.shutdown()
        server.server_close()
        stopped.append(True)

    yield f"http://127.0.0.1:{server.server_address[1]}", stop
    if not stopped:
        stop()


def test_a_server_that_dies_mid_run_fails_within_seconds(short_lived_server, tmp_path: Path, monkeypatch) -> None:
    """With the Tracker's bounds on MLflow's retries (7 retries with backoff 2 by default: ~4.6 minutes)."""
    uri, stop = short_lived_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(storage.resolve(str(tmp_path)), "eir-test")
    assert tracker.experiment_id == "1"
    assert {name: os.environ[name] for name in MLFLOW_DEFAULTS} == MLFLOW_DEFAULTS
    stop()
    start = time.monotonic()
    with pytest.raises(
        TrackingError,
        match=rf"^the MLflow tracking store {uri} failed while logging metrics \(.*Connection refused.*\); "
        "the run's files are kept: once the store answers again, continue with --resume$",
    ):
        tracker.metrics("0123", {"loss": 1.0})
    assert time.monotonic() - start < 20


def test_closing_runs_on_a_dead_server_never_raises(short_lived_server, tmp_path: Path, monkeypatch) -> None:
    """close_tree runs while a run stops: a dead store is logged, the error that stopped the run stays the one shown.
    (No retries here: the user's own MLFLOW_HTTP_REQUEST_MAX_RETRIES wins over the Tracker's bound.)"""
    uri, stop = short_lived_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(storage.resolve(str(tmp_path)), "eir-test")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    stop()
    start = time.monotonic()
    assert tracker.close_tree("0123", FAILED) == []
    assert time.monotonic() - start < 5


def test_a_server_that_refuses_the_api_names_the_setting_to_check(tmp_path: Path, monkeypatch) -> None:
    """A server (or proxy) that answers the health check but refuses MLflow's requests (401: credentials)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, body = (200, b"OK") if self.path == "/health" else (401, b'{"error_code": "UNAUTHENTICATED"}')
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        with pytest.raises(
            TrackingError,
            match=rf"^the MLflow tracking store {uri} failed while opening experiment "
            r"'eir-test' \(UNAUTHENTICATED: .*\); check MLFLOW_TRACKING_URI \(and a server's credentials",
        ):
            Tracker(storage.resolve(str(tmp_path)), "eir-test")
    finally:
        server.shutdown()
        server.server_close()


def test_bounds_leave_the_users_own_settings() -> None:
    environ = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}
    set_mlflow_defaults(environ)
    assert environ == {**MLFLOW_DEFAULTS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}


# ---------------------------------------------------------------- what a researcher reads (a real sqlite store)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> storage.Location:
    """One sqlite store for the module (creating one takes seconds); each test has its own experiment in it."""
    return storage.resolve(str(tmp_path_factory.mktemp("runs")))


@pytest.fixture
def tracker(store_root: storage.Location, request: pytest.FixtureRequest) -> Tracker:
    return Tracker(store_root, f"eir-{request.node.name}")


def _run(tracker: Tracker, run_id: str) -> Any:
    return tracker.client.get_run(run_id)


def test_names_description_source_and_only_the_params_the_method_reads(tracker: Tracker) -> None:
    config = load_config(overrides=["method.name=finetune", "run.name=baseline", "seed=3"])
    inactive = inactive_keys(config)
    assert {"paste.probability", "memory.size", "pseudo.threshold"} <= inactive
    parent = tracker.start(
        config.run.name,
        tags={**source_tags("0a1b2c3"), "eir.run_dir": "/runs/baseline"},
        description=run_description(config, "/runs/baseline/results.json"),
    )
    tracker.params(parent, run_params(config))
    child = tracker.start(step_run_name(config.run.name, 1), parent=parent)
    run = _run(tracker, parent)
    assert run.info.run_name == "baseline" and _run(tracker, child).info.run_name == "baseline/step_1"
    assert _run(tracker, child).data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["mlflow.note.content"] == (
        f"**finetune** on {config.dataset.name}, task {config.task.name} ({config.task.setting}), seed 3, "
        f"eval protocol {config.eval.protocol}.\n\nResults: `/runs/baseline/results.json`"
    )
    assert run.data.tags["mlflow.source.git.commit"] == "0a1b2c3"
    assert run.data.tags["mlflow.source.name"] == "launch.py"
    assert set(run.data.params) == set(config.flat()) - inactive
    assert run.data.params["seed"] == "3" and run.data.params["method.name"] == "finetune"


def test_finish_with_each_status(tracker: Tracker) -> None:
    ids = {status: tracker.start(status) for status in (FINISHED, FAILED, KILLED)}
    for status, run_id in ids.items():
        tracker.finish(run_id, status)
        assert _run(tracker, run_id).info.status == status
        assert _run(tracker, run_id).info.end_time is not None
    legacy = tracker.start("legacy")
    tracker.finish(legacy, False)
    assert _run(tracker, legacy).info.status == FAILED
    with pytest.raises(ValueError, match="bad run status 'DONE'"):
        tracker.finish(legacy, "DONE")


def test_results_status_maps_to_the_mlflow_status() -> None:
    assert [run_status(s) for s in ("finished", "failed", "interrupted", "stopped")] == [
        FINISHED,
        FAILED,
        KILLED,
        KILLED,
    ]
    with pytest.raises(ValueError, match="no MLflow status for a run 'running'"):
        run_status("running")


def test_close_tree_ends_every_run_still_running_below(tracker: Tracker) -> None:
    """A crashed run: its RUNNING step (and a sweep trial's RUNNING step) end with the run's status;
    a finished step stays FINISHED, runs of other trees are left alone."""
    sweep = tracker.start("sweep")
    trial = tracker.start("trial_a", parent=sweep)
    done = tracker.start(step_run_name("trial_a", 0), parent=trial)
    tracker.finish(done)
    crashed = tracker.start(step_run_name("trial_a", 1), parent=trial)
    other = tracker.start("other")
    other_step = tracker.start(step_run_name("other", 0), parent=other)
    assert sorted(tracker.close_tree(sweep, KILLED)) == sorted([sweep, trial, crashed])
    status = {run_id: _run(tracker, run_id).info.status for run_id in (sweep, trial, done, crashed, other, other_step)}
    assert status == {
        sweep: KILLED,
        trial: KILLED,
        done: FINISHED,
        crashed: KILLED,
        other: "RUNNING",
        other_step: "RUNNING",
    }
    assert tracker.close_tree(sweep, FAILED) == [], "a closed tree stays as it was closed"


def test_resume_reuses_the_runs_and_refuses_unknown_ones(tracker: Tracker, tmp_path: Path) -> None:
    run_dir = storage.resolve(str(tmp_path / "r"))
    storage.makedirs(run_dir)
    assert load_run_ids(run_dir) == {}
    parent = tracker.start("r")
    child = tracker.start("step_0", parent=parent)
    save_run_ids(run_dir, {"parent": parent, "step_0": child})
    tracker.close_tree(parent, FAILED)
    ids = load_run_ids(run_dir)
    assert ids == {"parent": parent, "step_0": child}
    # Resumed: the same runs, RUNNING again, the step renamed to the current scheme, its new tags set.
    assert tracker.start("r", run_id=ids["parent"], description="again") == parent
    assert tracker.start(step_run_name("r", 0), parent=parent, run_id=ids["step_0"]) == child
    assert (
        _run(tracker, parent).info.status == "RUNNING"
        and _run(tracker, parent).data.tags["mlflow.note.content"] == "again"
    )
    assert _run(tracker, child).info.run_name == "r/step_0"
    assert len(tracker.client.search_runs([tracker.experiment_id])) == 2, "resume never duplicates a run"
    with pytest.raises(
        TrackingError,
        match=r"^--resume: MLflow run 0{32} \(r, named in the run's mlflow_runs.json\) is "
        r"missing from the tracking store sqlite:///.*: resume with the MLFLOW_TRACKING_URI",
    ):
        tracker.start("r", run_id="0" * 32)
    tracker.client.delete_run(child)
    with pytest.raises(TrackingError, match=r"is deleted in the tracking store .*delete mlflow_runs.json"):
        tracker.start(step_run_name("r", 0), run_id=child)


def _table(tracker: Tracker, run_id: str) -> list[list[Any]]:
    with tempfile.TemporaryDirectory() as folder:
        document = json.loads(Path(tracker.client.download_artifacts(run_id, IOU_TABLE, folder)).read_text())
    assert document["columns"] == ["step", "class", "IoU"]
    return document["data"]


def test_reading_the_iou_table_back_prints_no_download_bar(tracker: Tracker, capfd) -> None:
    """The table is read back before each step's rows are added; the console shows step tables, not MLflow's bars."""
    run = tracker.start("quiet")
    for step in range(3):
        tracker.iou_table(run, step, {"background": 90.0, "car": 50.0 + step})
    tracker.iou_table(run, 1, {"background": 90.0, "car": 52.0})
    captured = capfd.readouterr()
    assert "Downloading artifacts" not in captured.err + captured.out
    assert len(_table(tracker, run)) == 6


def test_per_class_iou_table_compares_across_runs(tracker: Tracker) -> None:
    eir_run, finetune_run = tracker.start("eir"), tracker.start("finetune")
    tracker.iou_table(eir_run, 0, {"background": 90.0, "car": 50.5})
    tracker.iou_table(eir_run, 1, {"background": 88.0, "car": 40.0, "tree": None})
    tracker.iou_table(finetune_run, 1, {"background": 80.0, "car": 2.0, "tree": 30.0})
    assert _table(tracker, eir_run) == [
        [0, "background", 90.0],
        [0, "car", 50.5],
        [1, "background", 88.0],
        [1, "car", 40.0],
        [1, "tree", None],
    ]
    # Logged again (a resume, a step trained again): replaced, never doubled; the UI still knows it as a table.
    tracker.iou_table(eir_run, 0, {"background": 91.0, "car": 51.0})
    assert _table(tracker, eir_run) == [
        [0, "background", 91.0],
        [0, "car", 51.0],
        [1, "background", 88.0],
        [1, "car", 40.0],
        [1, "tree", None],
    ]
    assert json.loads(_run(tracker, eir_run).data.tags["mlflow.loggedArtifacts"]) == [
        {"path": IOU_TABLE, "type": "table"}
    ]
    # MLflow's own reader puts both runs' tables side by side (what the UI's comparison shows).
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.uri)
    try:
        both = tracker.client.load_table(
            tracker.experiment_id, IOU_TABLE, run_ids=[eir_run, finetune_run], extra_columns=["run_id"]
        )
    finally:
        mlflow.set_tracking_uri(previous)
    car_at_1 = both[(both["step"] == 1) & (both["class"] == "car")]
    assert dict(zip(car_at_1["run_id"], car_at_1["IoU"])) == {eir_run: 40.0, finetune_run: 2.0}


def test_launch_run_with_a_dead_tracking_server_is_one_error_line_and_leaves_no_run(tmp_path: Path) -> None:
    """`launch.py run` end to end: exit 2 within seconds with one `error:` line, before Ray starts and before the
    run directory gets a config.yaml, so the same command runs once the server is back (no "already exists")."""
    uri = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))} | {"MLFLOW_TRACKING_URI": uri}
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "run",
            str(REPO / "experiments" / "quickstart.yaml"),
            f"run.output_dir={tmp_path}",
            "run.name=dead",
            "dataset.synthetic_num_images=40",
            "dataset.synthetic_image_size=48",
            "task.name=15-5",
            "model.weights=null",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        (
            f"error: no MLflow tracking server answered at MLFLOW_TRACKING_URI={uri} (tried GET /health, "
            "connection refused): start the server, correct MLFLOW_TRACKING_URI, or unset it to log to a "
            "sqlite file in run.output_dir"
        )
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "starting a local Ray instance" not in result.stderr, "the check comes before Ray starts"
    assert not (tmp_path / "dead" / "config.yaml").exists() and not (tmp_path / "dead" / "results.json").exists()
    assert elapsed < 120, f"{elapsed:.0f} s (the dataset is prepared first; MLflow's own retries would take minutes)"
