"""A floor under the period of Ray Data's scheduling loop, so that a stream waiting for its consumer sleeps.

Ray 2.60's `StreamingExecutor` blocks in `ray.wait(..., timeout=0.1)` only while it has running tasks that are
not ready. When the consumer falls behind, the executor applies output backpressure: a finished map task's
outputs stay unread (`max_task_output_bytes_to_read` is 0), so `ray.wait` on that task returns at once, every
step, and the loop spins at ~0.2 ms a step (or it has no task running at all and skips the wait). A training
step's `SplitCoordinator` then burns ~70 % of a core for the rest of the step; on a 2-core machine the trainer's
two torch threads share one core with it and a CamVid step ran at 2.8 img/s instead of 9–10 (py-spy:
`process_completed_tasks` → `DownstreamCapacityBackpressurePolicy`; RAY_NOTES.md).

`PacedSchedulingLoop` is registered on a Dataset's context (`pace`, via `custom_execution_callback_classes`) and runs in
whichever process executes the Dataset (the driver, or a `SplitCoordinator` for a Train worker's shard): after a
step it sleeps out the rest of `MIN_STEP_S` since the previous one. A step longer than `MIN_STEP_S` (one that
waited in `ray.wait`, or did much work) never sleeps; a spinning loop is held to one step per `MIN_STEP_S`.
`ExecutionCallback` comes from `ray.data._internal` (the registration hook is public, its base class is not
exported): Ray is pinned.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

# 5 ms. A healthy step lasts up to `ray.wait`'s 100 ms timeout (it waits for all running tasks), so the floor only
# touches steps that returned at once: a spinning loop falls from ~5000 steps a second to 200, each of which can
# still dispatch many tasks and read many outputs (the fastest stream here delivers ~30 blocks a second).
MIN_STEP_S = 0.005


class PacedSchedulingLoop(ExecutionCallback):
    """Sleeps out the rest of `MIN_STEP_S` after a scheduling step that took less."""

    def __init__(self) -> None:
        self._last_step = time.perf_counter()

    def before_execution_starts(self, executor) -> None:
        self._last_step = time.perf_counter()  # the planner builds the callback earlier than the loop starts

    def on_execution_step(self, executor) -> None:
        elapsed = time.perf_counter() - self._last_step
        if elapsed < MIN_STEP_S:
            time.sleep(MIN_STEP_S - elapsed)
        self._last_step = time.perf_counter()


def pace(context) -> None:
    """Register `PacedSchedulingLoop` on a `ray.data.DataContext` (once): every Dataset executed under it is paced."""
    if PacedSchedulingLoop not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, PacedSchedulingLoop]
