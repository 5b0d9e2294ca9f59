"""The step-0 cache's key and its cross-process writer lock (real Ray tasks contend for it)."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from eir import storage
from eir.train import cache

KEY = {
    "config": {"seed": 0},
    "train_split": "a",
    "test_split": "b",
    "step0_classes": [0, 1],
    "scaling": {"num_workers": 1},
    "code": "x",
}


def test_entry_is_a_content_hash_of_the_key(tmp_path: Path) -> None:
    root = storage.resolve(str(tmp_path))
    assert cache.entry(root, KEY).uri == cache.entry(root, dict(reversed(KEY.items()))).uri
    assert cache.entry(root, KEY).uri != cache.entry(root, {**KEY, "code": "y"}).uri


def test_lock_names_differ_between_output_roots(tmp_path: Path) -> None:
    first = cache.entry(storage.resolve(str(tmp_path / "a")), KEY)
    second = cache.entry(storage.resolve(str(tmp_path / "b")), KEY)
    assert first.name == second.name and cache.lock_name(first) != cache.lock_name(second)


def _hold(uri: str, log_path: str, tag: str, hold_s: float) -> None:
    with cache.writer_lock(storage.resolve(uri), poll_s=0.2):
        start = time.time()
        time.sleep(hold_s)
        with open(log_path, "a") as log:
            log.write(f"{tag} {start} {time.time()}\n")


def test_concurrent_holders_never_overlap(ray_session, tmp_path: Path) -> None:
    import ray

    hold = ray.remote(num_cpus=0)(_hold)
    log_path = tmp_path / "intervals.txt"
    uri = str(tmp_path / "cache" / "step0" / "entry")
    ray.get([hold.remote(uri, str(log_path), f"t{i}", 1.0) for i in range(3)])
    intervals = sorted((float(a), float(b)) for _, a, b in (line.split() for line in log_path.read_text().splitlines()))
    assert len(intervals) == 3
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, f"two holders at once: {intervals}"


def test_a_dead_holder_releases_the_lock(ray_session, tmp_path: Path) -> None:
    import ray

    uri = str(tmp_path / "cache" / "step0" / "entry")

    @ray.remote(num_cpus=0, max_retries=0)
    def die_holding() -> None:
        with cache.writer_lock(storage.resolve(uri)):
            os._exit(1)

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(die_holding.remote())
    started = time.time()
    ray.get(ray.remote(num_cpus=0)(_hold).remote(uri, str(tmp_path / "log.txt"), "next", 0.0), timeout=60)
    assert (tmp_path / "log.txt").exists(), f"lock not released by a dead holder after {time.time() - started:.0f}s"
