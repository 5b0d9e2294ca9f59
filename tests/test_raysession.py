"""The local Ray instance every command (and this suite) starts."""

from __future__ import annotations

import logging

import pytest

from eir.raysession import PLACEMENT_GROUP_CLEANER_LOGGER


@pytest.mark.usefixtures("ray_session")
def test_local_workers_silence_the_placement_group_cleaner_polling() -> None:
    import ray

    @ray.remote(num_cpus=0)
    def levels() -> tuple[int, int]:
        return (logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel(),
                logging.getLogger("ray.train").getEffectiveLevel())

    cleaner, train = ray.get(levels.remote())
    assert cleaner == logging.ERROR
    assert train < logging.ERROR, "only the cleaner's logger is raised; Ray Train's other warnings still show"
