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
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def local_num_cpus() -> int:
    return int(os.environ.get("EIR_RAY_NUM_CPUS", max(8, 2 * (os.cpu_count() or 1))))


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
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": f"{__name__}.{quiet_state_api_polling.__name__}"})


def ensure_ray() -> None:
    global _started_locally
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    num_cpus = local_num_cpus()
    log.info("starting a local Ray instance with %d logical CPUs", num_cpus)
    start_local(num_cpus)
    _started_locally = True
