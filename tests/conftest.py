"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One small local Ray instance for every test that needs Ray (started once: it takes seconds).

    Tests that use it must not call ray.init/ray.shutdown themselves. If Ray is already up
    (started by the caller), it is left to whoever started it.
    """
    import ray

    from eir.raysession import start_local

    started = not ray.is_initialized()
    if started:
        start_local(num_cpus=4)
    yield
    if started:
        ray.shutdown()


# A run small enough for a test: 40 synthetic 48-px images, VOC's 15-5 layout, 2 + 1 epochs, no ImageNet weights.
TINY_RUN = (
    "dataset.name=synthetic",
    "dataset.synthetic_num_images=40",
    "dataset.synthetic_image_size=48",
    "task.name=15-5",
    "model.weights=null",
    "train.epochs=2",
    "train.epochs_incremental=1",
    "train.batch_size=8",
    "train.crop_size=48",
    "train.checkpoints_to_keep=1",
    "eval.batch_size=8",
    "scaling.cpus_per_worker=1",
)


@pytest.fixture(scope="session")
def tiny_run() -> tuple[str, ...]:
    """The overrides of a tiny end-to-end run (`TINY_RUN`); a test appends its own after them."""
    return TINY_RUN
