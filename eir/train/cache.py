"""The step-0 cache: train the base step once per (data, task, model, step-0 settings, seed, code).

Comparing methods never retrains step 0: its model and scores are stored under a content hash
of everything step 0 depends on, `<run.output_dir>/cache/step0/<hash>/`, complete only once a
marker is written last, and every later run that agrees reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import eir
from eir import storage
from eir.storage import Location

log = logging.getLogger(__name__)

# Config keys step 0 depends on (method, memory, incremental settings deliberately absent).
STEP0_KEYS = (
    "model.backbone",
    "model.weights",
    "model.output_stride",
    "train.epochs",
    "train.batch_size",
    "train.crop_size",
    "train.lr",
    "train.momentum",
    "train.weight_decay",
    "train.scale_min",
    "train.scale_max",
    "train.amp",
    "eval.protocol",
    "eval.crop_size",
    "seed",
)


# Bump when a change alters what step 0 trains or how it is scored (model, loss, augmentation,
# optimiser, evaluation). An explicit number rather than a hash of the source: a hash would throw
# the cache away on every unrelated edit (an EIR-only change, a log line), which defeats the cache
# across the sessions that long benchmarks span.
STEP0_CODE_VERSION = 1


def code_version() -> str:
    return f"{eir.__version__}-step0v{STEP0_CODE_VERSION}"


def step0_key(flat_config: dict[str, Any], *, train_split_checksum: str, test_split_checksum: str, step0_classes: list[int], scaling: dict[str, Any]) -> dict[str, Any]:
    """Everything step 0's result depends on, as a JSON-able dict (hashed into the cache path)."""
    return {
        "config": {key: flat_config[key] for key in STEP0_KEYS},
        "train_split": train_split_checksum,
        "test_split": test_split_checksum,
        "step0_classes": step0_classes,
        "scaling": scaling,  # the number of workers changes the per-worker batch and BN statistics
        "code": code_version(),
    }


def entry(output_root: Location, key: dict[str, Any]) -> Location:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return output_root.join("cache", "step0", digest)


def lookup(loc: Location) -> bool:
    return storage.is_complete(loc)


def list_entries(output_root: Location) -> list[dict[str, Any]]:
    base = output_root.join("cache", "step0")
    rows = []
    for name in storage.list_dir(base):
        loc = base.join(name)
        key = storage.read_json(loc.join("key.json")) if storage.exists(loc.join("key.json")) else {}
        rows.append({"hash": name, "complete": storage.is_complete(loc), **key.get("config", {})})
    return rows


def clear(output_root: Location) -> int:
    base = output_root.join("cache", "step0")
    count = len(storage.list_dir(base))
    storage.delete_dir(base)
    return count


@contextmanager
def writer_lock(loc: Location, poll_s: float = 2.0) -> Iterator[None]:
    """One writer per cache entry across processes and nodes: a named Ray actor holds the lock.

    Concurrent sweep trials that need the same missing step 0 queue here; the first trains it,
    the others find the entry complete (its marker is written last) when they get the lock.
    A holder that dies takes its actor with it, so the lock cannot outlive a crashed trainer.
    """
    import ray

    from eir.raysession import ensure_ray

    ensure_ray()
    owner = uuid.uuid4().hex
    name = f"eir-step0-lock-{loc.name}"
    waited = False
    while True:
        try:
            actor = _Lock.options(name=name, namespace="eir", get_if_exists=True).remote()
            if ray.get(actor.acquire.remote(owner)):
                break
        except ray.exceptions.RayActorError:
            continue  # the holder's lock actor died with it: take a fresh one
        if not waited:
            log.info("step-0 cache entry %s is being trained by another run: waiting", loc.name)
            waited = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        try:
            ray.get(actor.release.remote(owner))
        except ray.exceptions.RayActorError:
            pass


def _lock_class():
    import ray

    @ray.remote(num_cpus=0)
    class Lock:
        def __init__(self) -> None:
            self.owner: str | None = None

        def acquire(self, owner: str) -> bool:
            if self.owner is None:
                self.owner = owner
            return self.owner == owner

        def release(self, owner: str) -> None:
            if self.owner == owner:
                self.owner = None

    return Lock


class _LazyLock:
    """Defers `ray.remote` until first use, so importing this module does not import Ray."""

    _cls = None

    def options(self, **kwargs):
        if _LazyLock._cls is None:
            _LazyLock._cls = _lock_class()
        return _LazyLock._cls.options(**kwargs)


_Lock = _LazyLock()
