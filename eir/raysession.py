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

A failed start (an unreachable `RAY_ADDRESS`, no room in the temp dir, ...) is one `RayStartError`
saying why, which `launch.py` reports as one line. Ray itself is imported only when started, so the
command line can name this error without paying Ray's import.
"""

from __future__ import annotations

import logging
import os
import re
import socket

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0


class RayStartError(RuntimeError):
    """Ray could not be started or joined; the message says where and why."""


def local_num_cpus() -> int:
    """Logical CPUs of the local instance: EIR_RAY_NUM_CPUS, else twice the cores (at least 8)."""
    text = os.environ.get("EIR_RAY_NUM_CPUS")
    if text is None:
        return max(8, 2 * (os.cpu_count() or 1))
    if not text.strip().isdigit() or int(text) < 1:
        raise RayStartError(f"bad value {text!r} for EIR_RAY_NUM_CPUS: expected a positive integer (logical CPUs of the local Ray)")
    return int(text)


_started_locally = False


def started_locally() -> bool:
    """Whether this process started the private local instance (its logical CPUs exceed the cores)."""
    return _started_locally


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_polling() -> None:
    """Worker setup hook: silence the cleaner's once-a-second "state API unavailable" warning."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def start_local(num_cpus: int) -> None:
    """Start a private local instance without the dashboard (also the test suite's instance)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": f"{__name__}.{quiet_state_api_polling.__name__}"})


def ensure_ray() -> None:
    global _started_locally
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    num_cpus = None if address else local_num_cpus()
    try:
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
            return
        log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
        start_local(num_cpus)
    except Exception as exc:  # whatever ray.init raises, Ray did not start: say so in one line
        where = f"the cluster at RAY_ADDRESS={address}" if address else "a local instance"
        raise RayStartError(f"Ray could not start ({where}): {_first_line(exc)}") from exc
    _started_locally = True


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
        raise RayStartError(f"Ray could not start (the cluster at RAY_ADDRESS={address}): nothing answers at {host}:{port} "
                            f"({exc.strerror or exc}); start the cluster, or unset RAY_ADDRESS to run on a local Ray") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
