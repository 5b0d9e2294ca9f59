"""Put the process that makes training samples at idle CPU priority, so that a trainer on the same cores goes first.

Why: on a node whose cores the trainer also computes on (CPU training), the training stream's tasks and the
trainer's OpenMP threads share the cores, and the kernel shares them by runnable thread. While a stream of 4
tasks was producing on 2 cores, the trainer's epochs ran at 6–13 img/s against 27–46 img/s once it had finished
(`quickstart`, BENCHMARKS.md). The stream needs a few
per cent of the cores to stay ahead of such a trainer. Niceness cannot express that here: Ray starts every worker,
the trainer's included, at niceness 15 (`RAY_worker_niceness`), and 19 weighs 15/36 of 15 — the trainer would
still get only about half the cores against 8 tasks. Linux's `SCHED_IDLE` policy weighs 3 against nice 15's 36:
the tasks take what the trainer leaves, and when it waits for data its cores are idle and the tasks run at full
speed. On a GPU node the trainer's process needs little CPU, and the tasks get the cores as before.

Every thread of the process is moved (Linux keeps the policy per thread; threads started later inherit it). A
thread may move to `SCHED_IDLE` without privileges, but not back (sched(7), since Linux 2.6.39): a Ray worker
that ran a stream task stays idle-priority for later tasks, which then also yield to a trainer. Elsewhere
(no `SCHED_IDLE`), the process takes the highest niceness instead.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_NICENESS = 19  # POSIX's lowest priority: the fallback where SCHED_IDLE does not exist


def thread_ids() -> list[int]:
    """This process's threads (Linux: /proc/self/task); elsewhere [0], which the calls below read as the process."""
    tasks = Path("/proc/self/task")
    return sorted(int(entry.name) for entry in tasks.iterdir()) if tasks.is_dir() else [0]


def is_idle_priority(tid: int = 0) -> bool:
    """Whether thread `tid` (0: the caller) runs at idle priority."""
    if hasattr(os, "SCHED_IDLE"):
        return os.sched_getscheduler(tid) == os.SCHED_IDLE
    return os.getpriority(os.PRIO_PROCESS, tid) >= MAX_NICENESS


def yield_cpu() -> int:
    """Move every thread of this process to idle priority; returns how many threads moved (0 when all were)."""
    moved = 0
    for tid in thread_ids():
        try:
            if is_idle_priority(tid):
                continue
            if hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, tid, MAX_NICENESS)
            moved += 1
        except ProcessLookupError:  # the thread ended between listing and moving
            continue
    return moved


__all__ = ["MAX_NICENESS", "is_idle_priority", "thread_ids", "yield_cpu"]
