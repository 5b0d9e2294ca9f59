"""The local Ray instance every command (and this suite) starts."""

from __future__ import annotations

import logging

import pytest

from eir.raysession import (
    PLACEMENT_GROUP_CLEANER_LOGGER,
    RayStartError,
    ensure_ray,
    started_locally,
)


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


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fresh_process(monkeypatch):
    """ensure_ray as a fresh process meets it, whatever Ray this test process already runs."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("EIR_RAY_NUM_CPUS", raising=False)
    return ray


def test_an_address_where_nothing_answers_fails_at_once(fresh_process, monkeypatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    monkeypatch.setattr(fresh_process, "init", lambda **kw: pytest.fail("ray.init would wait without end"))
    with pytest.raises(RayStartError) as info:
        ensure_ray()
    assert str(info.value) == (f"Ray could not start (the cluster at RAY_ADDRESS=ray://127.0.0.1:{port}): nothing answers at "
                               f"127.0.0.1:{port} (Connection refused); start the cluster, or unset RAY_ADDRESS to run on a local Ray")


def test_a_failing_ray_init_is_one_ray_start_error(fresh_process, monkeypatch) -> None:
    def no_space(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fresh_process, "init", no_space)
    with pytest.raises(RayStartError, match=r"^Ray could not start \(a local instance\): OSError: \[Errno 28\] No space left on device$"):
        ensure_ray()
    assert not started_locally()


def test_a_bad_cpu_count_is_named(fresh_process, monkeypatch) -> None:
    monkeypatch.setenv("EIR_RAY_NUM_CPUS", "many")
    with pytest.raises(RayStartError, match="bad value 'many' for EIR_RAY_NUM_CPUS: expected a positive integer"):
        ensure_ray()


def test_ray_is_not_imported_to_name_the_error() -> None:
    import subprocess
    import sys

    code = "import sys, eir.raysession; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
