"""Work at idle CPU priority: on one helper thread per process, moved once; the caller's thread never moves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from eir.data.cpu_priority import at_idle_priority, is_idle_priority

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's SCHED_IDLE")


def _where() -> tuple[int, bool]:
    return threading.get_native_id(), is_idle_priority()


def test_work_runs_on_one_idle_thread_and_the_caller_stays_as_it_was() -> None:
    first, second = at_idle_priority(_where), at_idle_priority(_where)
    assert first[1] and second[1]
    assert first[0] == second[0] != threading.get_native_id()  # one helper thread, reused
    assert is_idle_priority(first[0]) and not is_idle_priority()


def test_threads_the_work_starts_inherit_idle_priority() -> None:
    def start_one() -> bool:
        seen: dict[str, bool] = {}
        child = threading.Thread(target=lambda: seen.update(idle=is_idle_priority()))
        child.start()
        child.join()
        return seen["idle"]

    assert at_idle_priority(start_one)


def test_the_work_gets_its_arguments_and_its_exceptions_reach_the_caller() -> None:
    assert at_idle_priority(pow, 2, 5) == 32 and at_idle_priority(int, "ff", base=16) == 255
    with pytest.raises(ZeroDivisionError):
        at_idle_priority(divmod, 1, 0)


CHILD = """
import json, os
from eir.data.cpu_priority import at_idle_priority, is_idle_priority
import threading
parent = at_idle_priority(threading.get_native_id)
pid = os.fork()
if pid == 0:
    child = at_idle_priority(threading.get_native_id)
    os.write(1, json.dumps({"child_helper": child, "idle": at_idle_priority(is_idle_priority)}).encode())
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_process_gets_its_own_idle_thread() -> None:
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["idle"] is True and seen["child_helper"] > 0
