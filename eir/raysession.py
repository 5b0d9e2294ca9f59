"""Start or join Ray the same way from every command.

With `RAY_ADDRESS` set (a cluster, a Ray Job), join it. Otherwise start a private local
instance (`address="local"`: never attach to some other Ray started on this machine) with more
logical CPUs than cores, so a trial, its Train workers and Ray Data tasks can all be scheduled
(RAY_NOTES.md: an actor pool can otherwise hold every CPU and deadlock the read tasks).

The local instance runs without the dashboard (it costs seconds at start-up and a core's share on a
laptop). Ray Train V2's PlacementGroupCleaner polls the state API, which the dashboard serves, once
a second and warns on every failed poll: 1,548 identical lines in one CamVid run. Its job (freeing
a dead controller's placement group on a long-lived cluster) does not arise on a private instance
that ends with its driver, so every local worker raises that one logger to ERROR.

The console carries the run's own lines (one per epoch, the step tables): Ray's INFO chatter (start-up,
Ray Data's plans, Train's worker-group lines, Ray's internal deprecations) is kept off it in the driver
and in every local worker, while Ray's warnings and errors still show. `launch.py --verbose` or
EIR_VERBOSE=1 brings Ray's logs back.

A failed start (an unreachable `RAY_ADDRESS`, no room in the temp dir, ...) is one `RayStartError`
saying why, which `launch.py` reports as one line.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings

import ray

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0
VERBOSE_ENV = "EIR_VERBOSE"


class RayStartError(RuntimeError):
    """Ray could not be started or joined; the message says where and why."""


def local_num_cpus() -> int:
    """Logical CPUs of the local instance: EIR_RAY_NUM_CPUS, else twice the cores (at least 8)."""
    text = os.environ.get("EIR_RAY_NUM_CPUS")
    if text is None:
        return max(8, 2 * (os.cpu_count() or 1))
    if not text.strip().isdigit() or int(text) < 1:
        raise RayStartError(
            f"bad value {text!r} for EIR_RAY_NUM_CPUS: expected a positive integer (logical CPUs of the local Ray)"
        )
    return int(text)


class _Session:
    """What this process did about Ray (one process, one Ray)."""

    started_locally = False


def started_locally() -> bool:
    """Whether this process started the private local instance (its logical CPUs exceed the cores)."""
    return _Session.started_locally


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# Notices Ray logs as warnings that say nothing about the run, by the logger that writes them: the banner
# of every local start, and the note that Ray Data's progress bars are off (eir turns them off on purpose and
# prints its own progress). Every other warning and error of Ray's still reaches the console.
KNOWN_NOTICES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    "ray.data._internal.progress": "Progress bars disabled",
}


def ray_logs_shown() -> bool:
    """Whether Ray's own INFO logs reach the console: `launch.py --verbose` or EIR_VERBOSE=1."""
    return os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")


class _DropNotice(logging.Filter):
    """Drops the records of one logger whose message starts with a known notice."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_logs() -> None:
    """Ray's INFO chatter off this process's console; Ray's warnings and errors stay.

    Ray Data configures its logger at import and again for every dataset a worker runs, from
    RAY_DATA_LOG_LEVEL: the variable (inherited by the workers a local instance starts) holds the
    level, the direct call covers a `ray.data` imported before this. Warnings Ray's own modules raise
    about Ray's own deprecated internals are not the run's to act on; those raised at eir's calls show.
    """
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    for name, prefix in KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")


def train_log_level() -> str:
    """Ray Train's console level for `RunConfig(logging_config=ray.train.LoggingConfig(log_level=...))`.

    Ray Train re-configures the `ray.train` loggers in its controller and workers after any setup hook
    ran, so its worker-group lines ("Requesting resources", "Started training worker group", ...) can
    only be kept off the console through the run's own config; its log files keep every level.
    """
    return "INFO" if ray_logs_shown() else "WARNING"


def quiet_state_api_polling() -> None:
    """Worker setup hook: silence the cleaner's once-a-second "state API unavailable" warning, and name
    this worker's own cluster for the state API's auto-detection.

    With another Ray instance on the machine (a second run, the test suite), auto-detection finds
    several and the cleaner's thread dies with a 30-line traceback each step; named in RAY_ADDRESS, its
    own cluster answers "unavailable" (no dashboard), which is the warning silenced here.
    """
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def quiet_local_worker() -> None:
    """Worker setup hook of a local instance whose Ray logs are not shown: the cleaner and Ray's chatter."""
    quiet_state_api_polling()
    quiet_ray_logs()


def _driver_log_level() -> int:
    """Before `ray.init`: quiet this process unless Ray's logs are shown; the `ray` logger's level for ray.init."""
    if ray_logs_shown():
        return logging.INFO
    quiet_ray_logs()
    return logging.WARNING


def start_local(num_cpus: int) -> None:
    """Start a private local instance without the dashboard (also the test suite's instance)."""
    hook = quiet_state_api_polling if ray_logs_shown() else quiet_local_worker
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        logging_level=_driver_log_level(),
        runtime_env={"worker_process_setup_hook": f"{__name__}.{hook.__name__}"},
    )


def ensure_ray() -> None:
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    num_cpus = None if address else local_num_cpus()
    try:
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True, logging_level=_driver_log_level())
            return
        log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
        start_local(num_cpus)
    except Exception as exc:  # whatever ray.init raises, Ray did not start: say so in one line
        where = f"the cluster at RAY_ADDRESS={address}" if address else "a local instance"
        raise RayStartError(f"Ray could not start ({where}): {_first_line(exc)}") from exc
    _Session.started_locally = True


def check_reachable(address: str) -> None:
    """One TCP connect to a `host:port` (or `ray://host:port`) RAY_ADDRESS before `ray.init`.

    Why: `ray.init` retries an address where nothing answers without end (measured: still waiting
    after 5 minutes, printing a warning every few seconds). `auto` and other forms are left to Ray.
    """
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]\s/]+?)\]?:(\d+)", address.strip())
    if not match:
        return
    host, port = match[1], int(match[2])
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayStartError(
            f"Ray could not start (the cluster at RAY_ADDRESS={address}): nothing answers at {host}:{port} "
            f"({exc.strerror or exc}); start the cluster, or unset RAY_ADDRESS to run on a local Ray"
        ) from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
