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
        with (
            pytest.raises(RunInUseError, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()}"),
            hold(run),
        ):
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
    (tmp_path / "run" / LOCK_FILE).write_text(
        json.dumps({"token": "old", "host": socket.gethostname(), "pid": _dead_pid(), "heartbeat": time.time()})
    )
    with caplog.at_level("WARNING"), hold(storage.resolve(tmp_path / "run")):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock left by pid" in caplog.text and "has exited" in caplog.text


def test_stale_rules() -> None:
    now = time.time()
    here, alive = socket.gethostname(), os.getpid()
    assert stale_reason({"host": here, "pid": alive, "heartbeat": now}, 0, now) is None
    assert stale_reason({"host": "other-node", "pid": 1, "heartbeat": now - 10}, 0, now) is None, (
        "another node: trust a fresh heartbeat"
    )
    assert "no heartbeat" in stale_reason({"host": "other-node", "pid": 1, "heartbeat": now - 1000}, 0, now)
    assert stale_reason({"host": here, "pid": alive, "heartbeat": now - 1000}, 0, now) is None, (
        "this host asks the process itself: a suspended laptop's run keeps its lock"
    )
    assert "has exited" in stale_reason({"host": here, "pid": _dead_pid(), "heartbeat": now}, 0, now)
    assert stale_reason({}, file_age_s=5, now=now) is None, "an unreadable lock may be being written"
    assert stale_reason({}, file_age_s=1000, now=now) == "an unreadable lock file"


def _remote(tmp_path: Path) -> storage.Location:
    """The object-store code path (a SubTreeFileSystem is not a LocalFileSystem) on a local folder."""
    run = storage.resolve("bucket/run", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    assert not run.is_local
    return run


def _heartbeat(lock: Path) -> float | None:
    """The record's heartbeat, or None while the stand-in is mid-rewrite.

    An object store replaces an object whole on PUT; the local folder standing in for it here truncates and then
    writes, so a read can land between the two (CI saw an empty file once). runlock's own reader treats such a read
    as "may be being written" (test_stale_rules); the test reads the same way.
    """
    try:
        return float(json.loads(lock.read_text())["heartbeat"])
    except (json.JSONDecodeError, KeyError):
        return None


def test_the_heartbeat_keeps_an_object_store_lock_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    lock = tmp_path / "bucket" / "run" / LOCK_FILE
    with hold(_remote(tmp_path)):
        first = json.loads(lock.read_text())["heartbeat"]  # written before hold() returns: no rewrite can race it
        deadline = time.monotonic() + 10  # a loaded machine may delay the heartbeat thread, never stop it
        latest = first
        while latest == first and time.monotonic() < deadline:
            time.sleep(0.05)
            latest = _heartbeat(lock) or first
        assert latest > first
    assert not lock.exists()


def test_a_holder_whose_object_store_lock_was_taken_stops_at_the_next_step(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(runlock, "SETTLE_S", 0.0)
    lock = tmp_path / "bucket" / "run" / LOCK_FILE
    with hold(_remote(tmp_path)) as lease:
        lease.check()  # still ours
        lock.write_text(json.dumps({"token": "other", "host": "node-2", "pid": 7, "heartbeat": time.time()}))
        time.sleep(0.3)
        with pytest.raises(RunInUseError, match="lost .* to another one: pid 7 on node-2"):
            lease.check()
    assert json.loads(lock.read_text())["token"] == "other", "the new holder's record is left alone"


def test_a_record_of_the_wrong_shape_reads_as_unreadable(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"pid": "not a number", "heartbeat": []}))
    with hold(storage.resolve(tmp_path / "run")):  # no traceback: the local lock is the kernel's, the record only talk
        pass


def test_another_process_is_refused(tmp_path: Path) -> None:
    """Across processes, as two `launch.py run`s would meet."""
    code = (
        "import sys, time; from eir import storage; from eir.runlock import hold\n"
        "with hold(storage.resolve(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"), hold(storage.resolve(tmp_path / "run")):
            pass
    finally:
        holder.kill()
        holder.wait()
    with hold(storage.resolve(tmp_path / "run")):  # the kernel released the killed holder's lock
        pass


def test_object_store_path_write_then_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No exclusive create on object stores: of two racing takers only the last writer proceeds."""
    monkeypatch.setattr(runlock, "SETTLE_S", 0.3)
    run = _remote(tmp_path)
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


def test_a_sweep_in_use_is_refused_before_ray(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import eir.raysession
    import launch

    started: list[str] = []
    monkeypatch.setattr(eir.raysession, "ensure_ray", lambda: started.append("ray"))
    sweep = Path(launch.__file__).parent / "experiments" / "sweeps" / "synthetic_tiny.yaml"
    with hold(storage.resolve(tmp_path / "sweeps" / "synthetic_tiny")):
        code = launch.main(["sweep", str(sweep), "model.weights=null", f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"is in use by pid {os.getpid()}" in err and "Traceback" not in err
    assert started == []


def test_a_command_that_wrote_nothing_leaves_no_folders(tmp_path: Path) -> None:
    with pytest.raises(KeyError), hold(storage.resolve(tmp_path / "out" / "sweeps" / "s")):
        raise KeyError("stopped before writing anything")
    assert list(tmp_path.iterdir()) == []
    with hold(storage.resolve(tmp_path / "out" / "run")):
        (tmp_path / "out" / "run" / "config.yaml").write_text("x")
    assert (tmp_path / "out" / "run" / "config.yaml").exists(), "a folder with files stays"
