"""One live command per run directory: a lock file held (and kept fresh) while a run writes.

Two `launch.py run`s with the same `run.name` would otherwise both start and mix their files in
one directory (one's config.yaml, the other's plan.json, two MLflow parents). The lock is a small
JSON file, `<run dir>/_LOCK`, naming its holder (host, pid, command, start time) and a heartbeat
the holder rewrites every `HEARTBEAT_S` seconds from a background thread.

A lock is stale, and is taken over with a warning, when its holder is on this host and its process
is gone, or when its heartbeat is older than `STALE_AFTER_S` (a holder on another node that died
with it, or a recycled pid). Local disks create the file exclusively (`O_EXCL`); object stores have
no exclusive create, so the taker writes its record, waits `SETTLE_S` and reads it back: of two
racing takers only the last writer finds its own token and proceeds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from eir import storage
from eir.storage import Location

log = logging.getLogger(__name__)

LOCK_FILE = "_LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0
SETTLE_S = 1.0


class RunInUseError(FileExistsError):
    """Another live command holds the run directory."""


@contextmanager
def hold(run_dir: Location) -> Iterator[None]:
    """Hold `run_dir`'s lock for the duration of the block; RunInUseError if a live command holds it."""
    lock = run_dir.join(LOCK_FILE)
    record = {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv)[:500],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "heartbeat": time.time(),
    }
    storage.makedirs(run_dir)
    _acquire(lock, record)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, record, stop), name="eir-run-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _holder(lock).get("token") == record["token"]:
            lock.fs.delete_file(lock.path)


def _acquire(lock: Location, record: dict[str, Any]) -> None:
    for _ in range(2):  # a second try after removing a stale lock
        if lock.is_local and _create_exclusive(lock.path, record):
            return
        if not storage.exists(lock):
            if not lock.is_local:
                storage.write_json_atomic(lock, record)
                time.sleep(SETTLE_S)
                if _holder(lock).get("token") == record["token"]:
                    return
            continue
        holder = _holder(lock)
        reason = stale_reason(holder, _age_s(lock))
        if reason is None:
            raise RunInUseError(_in_use_message(lock, holder))
        log.warning("run directory %s: taking over a stale lock (%s)", lock.parent.uri, reason)
        lock.fs.delete_file(lock.path)
    raise RunInUseError(_in_use_message(lock, _holder(lock)))


def _create_exclusive(path: str, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    return True


def _heartbeat(lock: Location, record: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        if _holder(lock).get("token") != record["token"]:
            log.error("run directory %s: this command's lock was taken over by another one", lock.parent.uri)
            return
        storage.write_json_atomic(lock, {**record, "heartbeat": time.time()})


def _holder(lock: Location) -> dict[str, Any]:
    """The lock's record; {} when it is gone or unreadable (half-written by a killed holder)."""
    try:
        found = json.loads(storage.read_bytes(lock).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def _age_s(lock: Location) -> float:
    """Seconds since the lock file was last written (covers an unreadable record)."""
    info = lock.fs.get_file_info(lock.path)
    return time.time() - info.mtime.timestamp() if info.mtime is not None else 0.0


def stale_reason(holder: dict[str, Any], file_age_s: float, now: float | None = None) -> str | None:
    """Why a lock no longer protects a live command, or None while its holder may be alive."""
    now = time.time() if now is None else now
    if not holder:
        return "an unreadable lock file" if file_age_s > STALE_AFTER_S else None
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return f"pid {holder.get('pid')} on this host has exited"
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"no heartbeat from {holder.get('host')} pid {holder.get('pid')} for {age:.0f} s"
    return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _in_use_message(lock: Location, holder: dict[str, Any]) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: {holder.get('command')})"
           if holder else "another command")
    return (f"run directory {lock.parent.uri} is in use by {who}; wait for it to finish or choose another run.name "
            f"(a lock whose holder died is taken over by itself after {STALE_AFTER_S:.0f} s; {lock.uri})")


__all__ = ["LOCK_FILE", "RunInUseError", "hold", "stale_reason"]
