"""CPU seconds per role of every process on this machine over a timed run: the input pipeline's profile.

On a CPU-bound machine a stream's wall time is decided by who uses the cores, so `bench pipeline` counts, per
run, the CPU of the driver, of the workers that make the samples (a DataLoader's forked children, Ray's task
workers), of Ray's own processes (raylet, GCS, its actors and agents) and of everything else. Linux's `/proc`
is read directly (no psutil in the project's dependencies); elsewhere the profile is empty.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
ROLES = ("driver", "sample_workers", "ray_system", "other")
# Ray names a worker process by what it runs: `ray::IDLE` between tasks, `ray::MapBatches(fn)` or
# `ray::ReadParquet...` during one. Other `ray::` names are actors (Ray Data's stats and autoscaling actors, Train's
# controller, the dashboard agent).
RAY_TASK_PREFIXES = ("ray::IDLE", "ray::Map", "ray::Read", "ray::FlatMap", "ray::Filter")


def snapshot() -> dict[int, tuple[int, str, float]]:
    """pid → (parent pid, command line, CPU seconds so far: user + system) of every readable process."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    processes = {}
    for entry in PROC.glob("[0-9]*") if PROC.is_dir() else ():
        try:
            # The command name in `stat` is in parentheses and may hold spaces: split after the last ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended between the listing and the read
            continue
        processes[int(entry.name)] = (int(fields[1]), command, (int(fields[11]) + int(fields[12])) / ticks)
    return processes


def role(pid: int, parent: int, command: str, driver: int) -> str:
    """Which of `ROLES` a process plays for a run driven by process `driver`."""
    if pid == driver:
        return "driver"
    if command.startswith(RAY_TASK_PREFIXES):
        return "sample_workers"
    # Before the parent test: a local `ray.init` starts the GCS and the raylet as the driver's children.
    if command.startswith("ray::") or "raylet" in command or "gcs_server" in command or "/ray/" in command:
        return "ray_system"
    if parent == driver:
        return "sample_workers"  # a DataLoader's workers are forks of the driver
    return "other"


def cpu_by_role(
    before: dict[int, tuple[int, str, float]], after: dict[int, tuple[int, str, float]], driver: int
) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (a process started in between counts from zero). A Ray
    worker renames itself with each task it runs, so a process is the same one by pid and takes its role from
    `after`."""
    used = dict.fromkeys(ROLES, 0.0)
    for pid, (parent, command, seconds) in after.items():
        start = before[pid][2] if pid in before else 0.0
        used[role(pid, parent, command, driver)] += max(0.0, seconds - start)
    return {name: round(value, 3) for name, value in used.items()}
