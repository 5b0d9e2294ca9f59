"""Run the work that makes training samples at idle CPU priority, so that a trainer on the same cores goes first.

Why: on a node whose cores the trainer also computes on (CPU training), the training stream's tasks and the
trainer's OpenMP threads share the cores, and the kernel shares them by runnable thread. While a stream of 4
tasks was producing on 2 cores, the trainer's epochs ran at 6–13 img/s against 27–46 img/s once it had finished
(`quickstart`, BENCHMARKS.md). The stream needs a few per cent of the cores to stay ahead of such a trainer.
Niceness cannot express that here: Ray starts every worker, the trainer's included, at niceness 15
(`RAY_worker_niceness`), and 19 weighs 15/36 of 15 — against 8 tasks the trainer would still get about half the
cores. Linux's `SCHED_IDLE` policy weighs 3 against nice 15's 36: the work takes what the trainer leaves, and when
the trainer waits for data its cores are idle and the work runs at full speed. On a GPU node the trainer's
process needs little CPU, and the work gets the cores as before.

The work runs on one helper thread per process, moved to `SCHED_IDLE` once (`at_idle_priority`), not on the
calling thread. A thread may move to `SCHED_IDLE` without privileges but not back (sched(7), since Linux 2.6.39),
and Ray reuses a task's worker process for later tasks and actors — a Train worker among them — which must not
inherit the stream's priority. Without `SCHED_IDLE` (not Linux) the helper thread takes the highest niceness.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

MAX_NICENESS = 19  # POSIX's lowest priority: the fallback where SCHED_IDLE does not exist

Result = TypeVar("Result")


def is_idle_priority(tid: int = 0) -> bool:
    """Whether thread `tid` (0: the caller; on Linux a thread id is also a process's main thread) is at idle
    priority."""
    if hasattr(os, "SCHED_IDLE"):
        return os.sched_getscheduler(tid) == os.SCHED_IDLE
    return os.getpriority(os.PRIO_PROCESS, tid) >= MAX_NICENESS


def idle_this_thread() -> None:
    """Move the calling thread (Linux: only it; threads it starts later inherit) to idle priority, once."""
    if is_idle_priority():
        return
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.setpriority(os.PRIO_PROCESS, 0, MAX_NICENESS)


class _IdleThread:
    """This process's one idle-priority thread, started on first use (a fork gets its own)."""

    lock = threading.Lock()
    executor: ThreadPoolExecutor | None = None
    pid = 0


def at_idle_priority(work: Callable[..., Result], *args: object, **kwargs: object) -> Result:
    """`work(*args, **kwargs)` run on this process's idle-priority thread; its result, or its exception."""
    with _IdleThread.lock:
        if _IdleThread.executor is None or _IdleThread.pid != os.getpid():
            _IdleThread.executor = ThreadPoolExecutor(1, "eir-idle-priority", initializer=idle_this_thread)
            _IdleThread.pid = os.getpid()
        executor = _IdleThread.executor
    return executor.submit(work, *args, **kwargs).result()


__all__ = ["MAX_NICENESS", "at_idle_priority", "idle_this_thread", "is_idle_priority"]
