"""The local Ray instance every command (and this suite) starts."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from eir.raysession import (
    KNOWN_NOTICES,
    PLACEMENT_GROUP_CLEANER_LOGGER,
    VERBOSE_ENV,
    RayStartError,
    ensure_ray,
    quiet_ray_logs,
    ray_logs_shown,
    started_locally,
    train_log_level,
)


@pytest.mark.usefixtures("ray_session")
def test_local_workers_silence_the_placement_group_cleaner_polling() -> None:
    import ray

    @ray.remote(num_cpus=0)
    def levels() -> tuple[int, int, str | None]:
        return (
            logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel(),
            logging.getLogger("ray.train").getEffectiveLevel(),
            os.environ.get("RAY_ADDRESS"),
        )

    cleaner, train, address = ray.get(levels.remote())
    assert cleaner == logging.ERROR
    assert train <= logging.WARNING, "only the cleaner's logger is raised to ERROR; Ray Train's warnings still show"
    assert address == ray.get_runtime_context().gcs_address, "the cleaner's auto-detection finds its own cluster"


@pytest.fixture
def ray_loggers(monkeypatch):
    """quiet_ray_logs on this process, undone afterwards (levels, notice filters, warning filters, env)."""
    names = ["ray", "ray.data", *KNOWN_NOTICES]
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters)) for name in names}
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_ray_logs()
        yield caught
    for name, (level, filters) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters[:] = filters


def _record(logger: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, message, None, None)


def test_ray_chatter_is_quiet_and_its_warnings_still_show(ray_loggers) -> None:
    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")  # "Execution plan of Dataset ..."
    assert not executor.isEnabledFor(logging.INFO) and executor.isEnabledFor(logging.WARNING)
    core = logging.getLogger("ray._private.worker")  # "Started a local Ray instance."
    assert not core.isEnabledFor(logging.INFO) and core.isEnabledFor(logging.WARNING)
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING", "Ray Data re-reads it for every dataset a worker runs"
    for name, notice in KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        assert not logger.filter(_record(name, logging.WARNING, f"{notice}. To enable, ..."))
        assert logger.filter(_record(name, logging.WARNING, "something else went wrong")), "other warnings still show"


def test_only_ray_internal_deprecations_are_silenced(ray_loggers) -> None:
    warnings.warn_explicit(
        "`exclude_resources` is deprecated",
        DeprecationWarning,
        "execution_options.py",
        436,
        module="ray.data._internal.execution.interfaces.execution_options",
        registry={},
    )
    warnings.warn_explicit(
        "`ray.train.report` outside a worker is deprecated",
        DeprecationWarning,
        "step.py",
        1,
        module="eir.train.step",
        registry={},
    )
    assert [str(w.message) for w in ray_loggers] == ["`ray.train.report` outside a worker is deprecated"]


@pytest.mark.parametrize(("value", "shown"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_eir_verbose_shows_ray_logs(monkeypatch, value: str | None, shown: bool) -> None:
    if value is None:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
    else:
        monkeypatch.setenv(VERBOSE_ENV, value)
    assert ray_logs_shown() is shown
    assert train_log_level() == ("INFO" if shown else "WARNING")


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
    assert str(info.value) == (
        f"Ray could not start (the cluster at RAY_ADDRESS=ray://127.0.0.1:{port}): nothing answers at "
        f"127.0.0.1:{port} (Connection refused); start the cluster, or unset RAY_ADDRESS to run on a local Ray"
    )


def test_a_failing_ray_init_is_one_ray_start_error(fresh_process, monkeypatch) -> None:
    def no_space(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fresh_process, "init", no_space)
    expected = r"^Ray could not start \(a local instance\): OSError: \[Errno 28\] No space left on device$"
    with pytest.raises(RayStartError, match=expected):
        ensure_ray()
    assert not started_locally()


def test_a_bad_cpu_count_is_named(fresh_process, monkeypatch) -> None:
    monkeypatch.setenv("EIR_RAY_NUM_CPUS", "many")
    with pytest.raises(RayStartError, match="bad value 'many' for EIR_RAY_NUM_CPUS: expected a positive integer"):
        ensure_ray()
