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
