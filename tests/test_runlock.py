"""One live command per run directory (eir/runlock.py), on a local disk and on the object-store path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from eir import runlock, storage
from eir.runlock import LOCK_FILE, RunInUseError, hold, stale_reason


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_holder_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    run = storage.resolve(tmp_path / "run")
    with hold(run):
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunInUseError, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()}"), hold(run):
            pass
    assert not (tmp_path / "run" / LOCK_FILE).exists(), "released on exit"
    with hold(run):  # and free again
        pass


def test_the_lock_is_released_when_the_block_fails(tmp_path: Path) -> None:
    run = storage.resolve(tmp_path / "run")
    with pytest.raises(KeyError), hold(run):
        raise KeyError("boom")
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_lock_whose_process_died_is_taken_over(tmp_path: Path, caplog) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps(
        {"token": "old", "host": socket.gethostname(), "pid": _dead_pid(), "heartbeat": time.time()}))
    with caplog.at_level("WARNING"), hold(storage.resolve(tmp_path / "run")):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over a stale lock" in caplog.text and "has exited" in caplog.text


def test_stale_rules() -> None:
    now = time.time()
    here, alive = socket.gethostname(), os.getpid()
    assert stale_reason({"host": here, "pid": alive, "heartbeat": now}, 0, now) is None
    assert stale_reason({"host": "other-node", "pid": 1, "heartbeat": now - 10}, 0, now) is None, "another node: trust a fresh heartbeat"
    assert "no heartbeat" in stale_reason({"host": "other-node", "pid": 1, "heartbeat": now - 1000}, 0, now)
    assert "no heartbeat" in stale_reason({"host": here, "pid": alive, "heartbeat": now - 1000}, 0, now), "a recycled pid"
    assert stale_reason({}, file_age_s=5, now=now) is None, "an unreadable lock may be being written"
    assert stale_reason({}, file_age_s=1000, now=now) == "an unreadable lock file"


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with hold(storage.resolve(tmp_path / "run")):
        first = json.loads((tmp_path / "run" / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["heartbeat"] > first


def test_another_process_is_refused(tmp_path: Path) -> None:
    """Across processes, as two `launch.py run`s would meet."""
    code = ("import sys, time; from eir import storage; from eir.runlock import hold\n"
            "with hold(storage.resolve(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"), hold(storage.resolve(tmp_path / "run")):
            pass
    finally:
        holder.kill()
        holder.wait()
    with hold(storage.resolve(tmp_path / "run")):  # the killed holder's lock is stale at once on this host
        pass


def test_object_store_path_write_then_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No exclusive create on object stores: of two racing takers only the last writer proceeds."""
    monkeypatch.setattr(runlock, "SETTLE_S", 0.3)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    run = storage.resolve("bucket/run", filesystem=fs)
    assert not run.is_local
    outcomes: list[str] = []

    def take() -> None:
        try:
            with hold(run):
                outcomes.append("held")
                time.sleep(0.5)
        except RunInUseError:
            outcomes.append("refused")

    racers = [threading.Thread(target=take) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(outcomes) == ["held", "refused"]
    assert not (tmp_path / "bucket" / "run" / LOCK_FILE).exists()
