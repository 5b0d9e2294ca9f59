"""Benchmarks: accuracy against the baselines and the cost of each part (`launch.py bench NAME`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _accuracy(name: str) -> Callable[..., Any]:
    def run(
        quick: bool = False,
        overrides: list[str] | None = None,
        limit: int | None = None,
        methods: list[str] | None = None,
        rerun: bool = False,
    ) -> Any:
        # Imported when this benchmark runs: `launch.py` imports this package, not every benchmark.
        from eir.bench.accuracy import run_accuracy

        if quick:
            raise ValueError(f"{name} has no --quick form: it is an accuracy benchmark (rerun to continue it)")
        return run_accuracy(name, overrides, limit, methods, rerun)

    return run


def _performance(name: str) -> Callable[..., Any]:
    """`eir.bench.<name>.run_<name>(quick, overrides)`, imported only when that benchmark runs."""

    def run(
        quick: bool = False,
        overrides: list[str] | None = None,
        limit: int | None = None,
        methods: list[str] | None = None,
        rerun: bool = False,
    ) -> Any:
        if limit is not None or methods or rerun:
            raise ValueError(f"{name}: --limit, --methods and --rerun apply to accuracy benchmarks only")
        return getattr(importlib.import_module(f"eir.bench.{name}"), f"run_{name}")(quick, overrides)

    return run


BENCHMARKS: dict[str, Callable[..., Any]] = {
    **{name: _performance(name) for name in ("pipeline", "iteration", "memory_store", "sweep_cache", "scaling", "gpu")},
    "accuracy_camvid": _accuracy("accuracy_camvid"),
    "accuracy_synthetic": _accuracy("accuracy_synthetic"),
}
