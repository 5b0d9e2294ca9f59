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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

import eir
from eir import storage
from eir.config import step0_keys
from eir.raysession import ensure_ray
from eir.storage import Location

log = logging.getLogger(__name__)

# Config keys step 0 depends on: those declared with `step0=True` in eir.config (method, memory and
# incremental settings deliberately absent). `entry` hashes the key with sorted keys, so only the set counts.
STEP0_KEYS = step0_keys()


# Bump when a change alters what step 0 trains or how it is scored (model, loss, augmentation,
# optimiser, evaluation). An explicit number rather than a hash of the source: a hash would throw
# the cache away on every unrelated edit (an EIR-only change, a log line), which defeats the cache
# across the sessions that long benchmarks span.
# 2: the key gained train.warmup_fraction, loss.bce_weight and scaling.use_gpu; 3: the method's step-0 loss family;
# 4: the softmax family's cross-entropy is a mean over all pixels (MiB's and PLOP's reduction);
# 5: the training stream deals every epoch a permutation of all rows (e88b4ee; before, a batch came from
# consecutive frames of one video sequence, so a step 0 trained then saw another data order).
STEP0_CODE_VERSION = 5


def code_version() -> str:
    return f"{eir.__version__}-step0v{STEP0_CODE_VERSION}"


def step0_key(
    flat_config: dict[str, Any],
    *,
    train_split_checksum: str,
    test_split_checksum: str,
    step0_classes: list[int],
    scaling: dict[str, Any],
    loss: dict[str, Any],
) -> dict[str, Any]:
    """Everything step 0's result depends on, as a JSON-able dict (hashed into the cache path).

    `loss` is the method's `step0_identity()`: methods of one loss family share step 0, others never do.
    """
    return {
        "config": {key: flat_config[key] for key in STEP0_KEYS},
        "loss": loss,
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
    """Whether the entry can be reused; a damaged one is quarantined (never copied into a run)."""
    return storage.reusable(loc, "step-0 cache entry")


def list_entries(output_root: Location) -> list[dict[str, Any]]:
    base = output_root.join("cache", "step0")
    rows = []
    for name in storage.list_dir(base):
        if name.startswith("."):  # quarantined entries (storage.quarantine)
            continue
        loc = base.join(name)
        problems = storage.damaged_files(loc) if storage.is_complete(loc) else []
        try:
            key = storage.read_json(loc.join("key.json")) if storage.exists(loc.join("key.json")) else {}
        except (ValueError, UnicodeDecodeError):
            key = None
        if not isinstance(key, dict) or not isinstance(key.get("config", {}), dict):
            key, problems = {}, [*problems, "key.json is not a JSON object of settings"]
        state = (
            ("DAMAGED: " + "; ".join(problems))
            if problems
            else "complete"
            if storage.is_complete(loc)
            else "INCOMPLETE"
        )
        rows.append({"hash": name, "state": state, **key.get("config", {})})
    return rows


def clear(output_root: Location) -> int:
    base = output_root.join("cache", "step0")
    count = len(storage.list_dir(base))
    storage.delete_dir(base)
    return count


@contextmanager
def writer_lock(loc: Location, poll_s: float = 2.0) -> Iterator[None]:
    """One writer per cache entry across processes and nodes: holding the lock is owning a named Ray actor.

    Concurrent sweep trials that need the same missing step 0 queue here; the first trains it,
    the others find the entry complete (its marker is written last) when they get the lock.
    Creating a named actor is the atomic test-and-set (the GCS registers the name synchronously
    and refuses a second one, measured with two racing processes), and the actor is owned by the
    process that created it, so a holder that dies takes the lock with it. A shared lock actor
    with an `owner` field would not do: its lifetime is tied to whichever process created it, so
    it can die under a live holder and admit a second writer (CI caught that).
    """
    ensure_ray()
    name = lock_name(loc)
    waited = False
    while True:
        try:
            token = _LockToken.options(name=name, namespace=LOCK_NAMESPACE).remote()
            break
        except ValueError:  # ActorAlreadyExistsError: another run holds it
            if not waited:
                log.info("step-0 cache entry %s is being trained by another run: waiting", loc.name)
                waited = True
            time.sleep(poll_s)
    try:
        yield
    finally:
        ray.kill(token)


LOCK_NAMESPACE = "eir"


def lock_name(loc: Location) -> str:
    """Per entry *and* per output root: two roots holding the same key are two separate caches."""
    return "eir-step0-lock-" + hashlib.sha256(loc.uri.encode()).hexdigest()[:24]


@ray.remote(num_cpus=0)
class _LockToken:
    """Holds nothing: its existence under the lock's name is the lock."""
