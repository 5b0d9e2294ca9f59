"""Benchmarks: accuracy against the baselines and the cost of each part (`launch.py bench NAME`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _accuracy(name: str) -> Callable[..., Any]:
    def run(quick: bool = False, overrides: list[str] | None = None, limit: int | None = None, methods: list[str] | None = None) -> Any:
        from eir.bench.accuracy import run_accuracy

        if quick:
            raise ValueError(f"{name} has no --quick form: it is an accuracy benchmark (rerun to continue it)")
        return run_accuracy(name, overrides, limit, methods)

    return run


def _memory_store(quick: bool = False, overrides: list[str] | None = None, limit: int | None = None, methods: list[str] | None = None) -> Any:
    from eir.bench.memory_store import run_memory_store

    return run_memory_store(quick, overrides)


def _iteration(quick: bool = False, overrides: list[str] | None = None, limit: int | None = None, methods: list[str] | None = None) -> Any:
    from eir.bench.iteration import run_iteration

    return run_iteration(quick, overrides)


BENCHMARKS: dict[str, Callable[..., Any]] = {
    "iteration": _iteration,
    "memory_store": _memory_store,
    "accuracy_camvid": _accuracy("accuracy_camvid"),
    "accuracy_synthetic": _accuracy("accuracy_synthetic"),
}
