"""The training stream's task settings as the config gives them (`data.*`)."""

from __future__ import annotations

from eir.config import load_config
from eir.data.pipeline import StreamTasks
from eir.train.step_data import stream_tasks


def test_the_stream_tasks_take_the_configured_cpus_and_cap() -> None:
    assert stream_tasks(load_config()) == StreamTasks(num_cpus=1.0, per_core=0)  # Ray Data's default: no cap
    config = load_config(overrides=["data.num_cpus_per_worker=2", "data.stream_tasks_per_core=2"])
    assert stream_tasks(config) == StreamTasks(num_cpus=2.0, per_core=2)
