"""Idle CPU priority for the process that makes training samples: every thread, once, inherited by later threads.
Each test that moves threads runs in a child process: a process cannot move back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eir.data.cpu_priority import is_idle_priority, thread_ids

CHILD = """
import json, os, threading
from eir.data.cpu_priority import is_idle_priority, thread_ids, yield_cpu
stop = threading.Event()
worker = threading.Thread(target=stop.wait)  # started before the move: must move too
worker.start()
moved = [yield_cpu(), yield_cpu()]
late = {}
later = threading.Thread(target=lambda: late.update(idle=is_idle_priority()))
later.start(); later.join()
idle = [is_idle_priority(tid) for tid in thread_ids()]
stop.set(); worker.join()
print(json.dumps({"moved": moved, "idle": idle, "late": late["idle"]}))
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's SCHED_IDLE")
def test_every_thread_moves_once_and_new_threads_inherit() -> None:
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert len(seen["idle"]) >= 2 and all(seen["idle"])
    assert seen["moved"][0] >= 2 and seen["moved"][1] == 0  # the second call finds nothing left to move
    assert seen["late"] is True


def test_this_test_process_is_not_idle_and_lists_its_threads() -> None:
    ids = thread_ids()
    assert ids and all(isinstance(tid, int) for tid in ids)
    assert not is_idle_priority()  # nothing moved the runner itself
