"""Run one continual step as a Ray Train `TorchTrainer` and return its confusion matrix.

One trainer per step, named `step_<t>` under the run directory: Train V2 finds a run's state by
`storage_path/name`, so a restarted driver (`--resume`) continues the unfinished step from its
last epoch checkpoint, and a fresh run never shares a name with another run's step.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray.data
import torch
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from eir import storage
from eir.raysession import train_log_level
from eir.storage import Location
from eir.train.plan import StepPlan
from eir.train.worker import CHECKPOINT_FILE, train_step_worker

log = logging.getLogger(__name__)


class EvalShardingConfig(DataConfig):
    """Ray Train's data config, except that each worker scores only its share of the test rows.

    Ray's default split is `streaming_split(equal=True)`, which may drop rows to even the shares out: right for
    training, wrong for a score, whose confusion matrices the workers sum. The test set is therefore split with
    `equal=False` (every row on exactly one worker), so no worker decodes an image another one scores.
    """

    UNEVEN = frozenset({"test"})

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: list | None,
        worker_node_ids: list | None,
        **kwargs,
    ) -> list[dict]:
        even = {name: ds for name, ds in datasets.items() if name not in self.UNEVEN}
        shards = (
            super().configure(even, world_size, worker_handles, worker_node_ids, **kwargs)
            if even
            else [{} for _ in range(world_size)]
        )
        for name in datasets.keys() & self.UNEVEN:
            for shard, split in zip(shards, datasets[name].streaming_split(world_size, equal=False), strict=True):
                shard[name] = split
        return shards


@dataclass
class StepOutcome:
    confusion: np.ndarray
    epochs: list[dict]  # one entry per trained epoch, restarts included: loss, lr, images_per_s, …
    model_uri: str
    restarts: int  # times Ray Train restarted the worker group from a checkpoint


def worker_resources(cpus: float, use_gpu: bool, custom: str | None) -> dict[str, float]:
    """What each Train worker reserves: its CPUs, a GPU with scaling.use_gpu, one unit of scaling.worker_resource."""
    return {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {}), **({custom: 1.0} if custom else {})}


def run_train_step(
    plan: StepPlan,
    train_ds: ray.data.Dataset,
    eval_ds: ray.data.Dataset,
    step_dir: Location,
    *,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    worker_resource: str | None,
    checkpoints_to_keep: int,
    max_failures: int,
) -> StepOutcome:
    """Fit the step, then publish `step_dir/model.pt` (weights + head sizes) for step t+1."""
    trainer = _InterruptibleTrainer(
        train_step_worker,
        train_loop_config=plan.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(cpus_per_worker, use_gpu, worker_resource),
        ),
        run_config=RunConfig(
            logging_config=LoggingConfig(log_level=train_log_level()),
            name="train",
            **storage.ray_storage(step_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": train_ds, "test": eval_ds},
        dataset_config=EvalShardingConfig(datasets_to_split=["train", "test"]),
    )
    try:
        with _sigint_handler_restored():
            result = trainer.fit()
    except BaseException as exc:
        if trainer.interrupted:
            raise KeyboardInterrupt(f"step {plan.step} aborted by Ctrl-C") from exc
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt(f"step {plan.step} aborted by Ctrl-C")
    if result.error is not None:
        raise RuntimeError(f"step {plan.step} failed: {result.error}") from result.error
    confusion = np.asarray(result.metrics["confusion"], dtype=np.int64)
    with result.checkpoint.as_directory() as folder:
        state = torch.load(f"{folder}/{CHECKPOINT_FILE}", map_location="cpu", weights_only=True)
    model_loc = step_dir.join("model.pt")
    _write_model(model_loc, {"model": state["model"], "head_sizes": state["head_sizes"]})
    return StepOutcome(
        confusion=confusion, epochs=state["history"], model_uri=model_loc.uri, restarts=len(state["resumed_at"])
    )


class _InterruptibleTrainer(TorchTrainer):
    """A TorchTrainer that remembers whether its `fit()` was stopped by Ctrl-C.

    Ray Train's own SIGINT handler aborts the run gracefully and then lets `fit()` end with an
    actor error or `SystemExit`, which would read as a failed run. Wrapping the handler it
    installs (the private hook of ray 2.60, which the project pins) tells an interrupt apart, so
    the run is recorded as `interrupted` and its MLflow runs as KILLED.
    """

    interrupted = False

    def _register_sigint_handler(self, controller) -> None:
        super()._register_sigint_handler(controller)
        ray_handler = signal.getsignal(signal.SIGINT)

        def handler(signum, frame) -> None:
            self.interrupted = True
            ray_handler(signum, frame)

        signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def _sigint_handler_restored() -> Iterator[None]:
    """Put back the caller's SIGINT handler once `fit()` returns.

    Ray Train 2.60's `fit()` installs a handler that aborts *its* controller and never removes it.
    Left in place, a Ctrl-C between steps (pseudo-labelling, evaluation, building the memory) goes
    to the finished step's controller, where abort is a no-op, and is swallowed. Signal handlers
    can only be set from the main thread; elsewhere (a Tune trial) Ray installs none either.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_model(loc: Location, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes_atomic(loc, buffer.getvalue())
