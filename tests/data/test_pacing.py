"""The floor under Ray Data's scheduling-loop period (`eir.data.pacing`): on a fake clock, and on the real
training stream, whose executor runs it in a `SplitCoordinator` as a Train worker's shard does."""

from __future__ import annotations

import numpy as np
import pytest
import ray.data

from eir import storage
from eir.data import pacing
from eir.data.codec import encode_png
from eir.data.ingest import read_rows
from eir.data.pacing import MIN_STEP_S, PacedSchedulingLoop, pace
from eir.data.pipeline import StreamSpec, train_stream
from eir.data.prepare import ensure_prepared
from eir.tasks import get_task


class FakeClock:
    """`time` as the pacing module sees it: `perf_counter` reads `now`, `sleep` advances it and is recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pacing, "time", fake)
    return fake


def test_a_spinning_loop_is_held_to_one_step_per_floor(clock: FakeClock) -> None:
    loop = PacedSchedulingLoop()
    for _ in range(100):  # a step of 0.2 ms, as py-spy saw the backpressured executor take
        clock.now += 0.0002
        loop.on_execution_step(executor=None)
    assert clock.slept == pytest.approx([MIN_STEP_S - 0.0002] * 100)
    assert clock.now - 100.0 == pytest.approx(100 * MIN_STEP_S), "100 steps take 100 floors, not 20 ms"


def test_a_step_longer_than_the_floor_is_never_delayed(clock: FakeClock) -> None:
    loop = PacedSchedulingLoop()
    loop.before_execution_starts(executor=None)
    for step in (0.1, 2 * MIN_STEP_S, 0.03):  # ray.wait's 100 ms timeout, twice the floor, a step that dispatched
        clock.now += step
        loop.on_execution_step(executor=None)
    assert clock.slept == []


def test_pace_registers_the_callback_once_and_keeps_others() -> None:
    class Other(ray.data._internal.execution.execution_callback.ExecutionCallback):
        pass

    context = ray.data.DataContext()
    context.custom_execution_callback_classes = [Other]
    pace(context)
    pace(context)
    assert context.custom_execution_callback_classes == [Other, PacedSchedulingLoop]


@pytest.mark.slow
def test_the_training_stream_is_paced_and_a_paced_split_delivers_every_row(ray_session, tmp_path) -> None:
    root = storage.resolve(tmp_path)
    manifest = ensure_prepared("synthetic", "", "train", root, synthetic=(12, 32, 0), progress=False)
    ids = read_rows(manifest).column("id").to_pylist()
    stream = train_stream(manifest, ids, StreamSpec(lut=get_task("synthetic", "10-10").train_lut(1), crop_size=16))
    assert PacedSchedulingLoop in stream.context.custom_execution_callback_classes
    (shard,) = stream.streaming_split(1, equal=True)  # executed by a SplitCoordinator actor, callback and all
    assert sum(len(b["image"]) for b in shard.iter_batches(batch_size=4, batch_format="numpy")) == len(ids)


@pytest.mark.slow
def test_a_stream_over_rows_read_elsewhere_is_paced_on_its_own_context(ray_session) -> None:
    """Rows that never passed the project's reader (a fresh global context, nothing paced): the stream itself is."""
    saved = ray.data.DataContext.get_current()
    ray.data.DataContext._set_current(ray.data.DataContext())
    try:
        label = encode_png(np.zeros((16, 16), np.uint8))
        rows = ray.data.from_items([{"image": encode_png(np.zeros((16, 16, 3), np.uint8)), "label": label}] * 4)
        stream = train_stream(None, None, StreamSpec(lut=np.arange(256, dtype=np.uint8), crop_size=16), rows=rows)
        assert PacedSchedulingLoop in stream.context.custom_execution_callback_classes
        assert PacedSchedulingLoop not in ray.data.DataContext.get_current().custom_execution_callback_classes
    finally:
        ray.data.DataContext._set_current(saved)
