"""One live command per directory: a lock held while a run (or a sweep) writes its folder.

Two `launch.py run`s with the same `run.name` would otherwise both start and mix their files in
one directory (one's config.yaml, the other's plan.json, two MLflow parents). The lock is the file
`<dir>/_LOCK`, whose JSON record names its holder (host, pid, command, start time) for the message
the second command prints.

- Local disks: the holder keeps an exclusive `flock` on the file, which the kernel releases when
  the process ends however it ends, so a killed run never leaves a lock behind and nothing has to
  guess about staleness. After locking, the holder checks that the path still names the file it
  locked (a releasing holder unlinks it), so two commands can never hold two generations of it.
- Object stores have neither locks nor exclusive creates: the holder rewrites its record every
  `HEARTBEAT_S` seconds; a taker writes its own record, waits `SETTLE_S` and reads it back (of two
  racing takers only the last writer proceeds). A record is stale when its holder is on this host
  and its process is gone, or when it is on another host and its heartbeat is older than
  `STALE_AFTER_S`. A holder that finds its record replaced stops at the next step (`Lease.check`).
"""

from __future__ import annotations

import fcntl
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
    """Another live command holds the directory (or took it over from this one)."""


class Lease:
    """What a holder checks between steps: whether its object-store lock was taken over."""

    def __init__(self, lock: Location) -> None:
        self.lock = lock
        self.lost_to: dict[str, Any] | None = None

    def check(self) -> None:
        if self.lost_to is not None:
            raise RunInUseError(f"this command lost {self.lock.uri} to another one: " + _holder_text(self.lost_to))


@contextmanager
def hold(folder: Location) -> Iterator[Lease]:
    """Hold `folder`'s lock for the duration of the block; RunInUseError if a live command holds it."""
    lock = folder.join(LOCK_FILE)
    record = {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": " ".join(sys.argv)[:500],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "heartbeat": time.time(),
    }
    lease = Lease(lock)
    if lock.is_local:
        created = _missing_folders(folder.path)
        storage.makedirs(folder)
        try:
            with _flocked(lock, record):
                yield lease
        finally:
            for path in created:  # a command that stopped before writing anything leaves no empty folders
                try:
                    os.rmdir(path)
                except OSError:  # not empty (the run wrote its files) or gone: keep going up no further
                    break
        return
    storage.makedirs(folder)
    _acquire_remote(lock, record)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, record, stop), name="eir-run-lock", daemon=True)
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join()
        if _holder(lock).get("token") == record["token"]:
            lock.fs.delete_file(lock.path)


@contextmanager
def _flocked(lock: Location, record: dict[str, Any]) -> Iterator[None]:
    while True:
        fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUseError(_in_use_message(lock, _holder(lock))) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock.path).st_ino
        except FileNotFoundError:  # unlinked by a holder releasing it between our open and our lock
            same_file = False
        if same_file:
            break
        os.close(fd)
    try:
        previous = _holder(lock)
        if previous:  # a holder that died without releasing: the kernel dropped its lock
            log.warning(
                "run directory %s: taking over the lock left by %s (it has exited)",
                lock.parent.uri,
                _holder_text(previous),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.unlink(lock.path)  # unlinked while still locked: a waiting opener re-checks the inode
        os.close(fd)


def _missing_folders(path: str) -> list[str]:
    """The folders `makedirs(path)` would create, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _acquire_remote(lock: Location, record: dict[str, Any]) -> None:
    for _ in range(2):  # a second try after a stale record was removed
        if storage.exists(lock):
            holder = _holder(lock)
            reason = stale_reason(holder, _age_s(lock))
            if reason is None:
                raise RunInUseError(_in_use_message(lock, holder))
            log.warning("run directory %s: taking over a stale lock (%s)", lock.parent.uri, reason)
        storage.write_json_atomic(lock, record)
        time.sleep(SETTLE_S)
        if _holder(lock).get("token") == record["token"]:
            return
    raise RunInUseError(_in_use_message(lock, _holder(lock)))


def _heartbeat(lease: Lease, record: dict[str, Any], stop: threading.Event) -> None:
    """Keep the record fresh; a passing storage error is retried at the next beat, not fatal."""
    while not stop.wait(HEARTBEAT_S):
        try:
            found = _holder(lease.lock)
            if found.get("token") not in (None, record["token"]):
                lease.lost_to = found
                log.error(
                    "run directory %s: %s took over this command's lock", lease.lock.parent.uri, _holder_text(found)
                )
                return
            storage.write_json_atomic(lease.lock, {**record, "heartbeat": time.time()})
        except OSError as exc:
            log.warning("run directory %s: could not refresh the lock (%s); retrying", lease.lock.parent.uri, exc)


def _holder(lock: Location) -> dict[str, Any]:
    """The lock's record; {} when it is gone, empty, unreadable or of the wrong shape."""
    try:
        found = json.loads(storage.read_bytes(lock).decode("utf-8"))
        int(found["pid"])  # the fields the staleness rules read, of the types they need
        float(found["heartbeat"])
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
        return {}
    return found


def _age_s(lock: Location) -> float:
    """Seconds since the lock file was last written (covers an unreadable record)."""
    info = lock.fs.get_file_info(lock.path)
    return time.time() - info.mtime.timestamp() if info.mtime is not None else 0.0


def stale_reason(holder: dict[str, Any], file_age_s: float, now: float | None = None) -> str | None:
    """Why an object-store lock record no longer protects a live command, or None while it may."""
    now = time.time() if now is None else now
    if not holder:
        return "an unreadable lock file" if file_age_s > STALE_AFTER_S else None
    if holder.get("host") == socket.gethostname():  # this host can ask the process itself
        alive = _alive(int(holder.get("pid", -1)))
        return None if alive else f"pid {holder.get('pid')} on this host has exited"
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


def _holder_text(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: {holder.get('command')})"
        if holder
        else "another command"
    )


def _in_use_message(lock: Location, holder: dict[str, Any]) -> str:
    return (
        f"run directory {lock.parent.uri} is in use by {_holder_text(holder)}; wait for it to finish or choose "
        f"another name ({lock.uri})"
    )


__all__ = ["LOCK_FILE", "Lease", "RunInUseError", "hold", "stale_reason"]
