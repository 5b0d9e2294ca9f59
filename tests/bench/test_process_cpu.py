"""The pipeline benchmark's CPU profile: roles of processes, and CPU counted between two snapshots."""

from __future__ import annotations

import os
import sys
import time

import pytest

from eir.bench.process_cpu import ROLES, cpu_by_role, role, snapshot

DRIVER = 100


@pytest.mark.parametrize(
    ("pid", "parent", "command", "expected"),
    [
        (DRIVER, 1, "python launch.py bench pipeline", "driver"),
        (101, DRIVER, "python launch.py bench pipeline", "sample_workers"),  # a DataLoader worker, forked
        (102, 50, "ray::MapBatches(_train_block)", "sample_workers"),
        (103, 50, "ray::IDLE", "sample_workers"),
        (104, 50, "ray::_StatsActor", "ray_system"),
        (105, 1, "/venv/lib/python3.12/site-packages/ray/core/src/ray/raylet/raylet --node_id=x", "ray_system"),
        (106, DRIVER, "/venv/lib/python3.12/site-packages/ray/core/src/ray/gcs/gcs_server --port=0", "ray_system"),
        (107, 1, "/usr/bin/bash", "other"),
        (108, 1, "", "other"),  # a kernel thread has no command line
    ],
)
def test_each_process_gets_its_role(pid: int, parent: int, command: str, expected: str) -> None:
    assert role(pid, parent, command, DRIVER) == expected


def test_cpu_counts_from_the_first_snapshot_by_pid_and_new_processes_from_zero() -> None:
    before = {DRIVER: (1, "python", 10.0), 102: (50, "ray::IDLE", 3.0), 104: (50, "ray::_StatsActor", 1.0)}
    after = {
        DRIVER: (1, "python", 10.5),
        102: (50, "ray::MapBatches(_train_block)", 7.0),  # the same worker, renamed by its task
        104: (50, "ray::_StatsActor", 1.25),
        109: (50, "ray::MapBatches(_train_block)", 2.0),  # started during the run
    }
    expected = {"driver": 0.5, "sample_workers": 6.0, "ray_system": 0.25, "other": 0.0}
    assert cpu_by_role(before, after, DRIVER) == expected
    assert tuple(cpu_by_role({}, {}, DRIVER)) == ROLES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_this_process_is_seen_and_its_cpu_counted_as_the_driver() -> None:
    before = snapshot()
    assert before[os.getpid()][0] == os.getppid()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU in this process
        pass
    used = cpu_by_role(before, snapshot(), os.getpid())
    assert 0.25 <= used["driver"] <= 1.0
