"""The training stream's task settings as the config gives them (`data.*`)."""

from __future__ import annotations

import pytest

from eir.config import load_config
from eir.data.pipeline import StreamTasks
from eir.train.step_data import stream_tasks


@pytest.mark.parametrize(
    ("priority", "use_gpu", "idle"),
    [
        ("auto", False, True),  # a CPU trainer competes with the stream for the cores: the trainer goes first
        ("auto", True, False),  # a GPU trainer's node keeps its cores for the stream
        ("idle", True, True),
        ("normal", False, False),
    ],
)
def test_stream_priority_follows_the_trainer_under_auto(priority: str, use_gpu: bool, idle: bool) -> None:
    config = load_config(overrides=[f"data.stream_cpu_priority={priority}", f"scaling.use_gpu={str(use_gpu).lower()}"])
    assert stream_tasks(config).idle_priority is idle


def test_the_defaults_cap_two_tasks_per_core_and_pass_the_task_cpus() -> None:
    assert stream_tasks(load_config()) == StreamTasks(num_cpus=1.0, per_core=2, idle_priority=True)
    config = load_config(overrides=["data.num_cpus_per_worker=2", "data.stream_tasks_per_core=0"])
    assert stream_tasks(config) == StreamTasks(num_cpus=2.0, per_core=0, idle_priority=True)
