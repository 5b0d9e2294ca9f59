"""Benchmarks: accuracy against the baselines and the cost of each part (`launch.py bench NAME`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _accuracy(name: str) -> Callable[..., Any]:
    def run(quick: bool = False, overrides: list[str] | None = None) -> Any:
        from eir.bench.accuracy import run_accuracy

        if quick:
            raise ValueError(f"{name} has no --quick form: it is an accuracy benchmark (rerun to continue it)")
        return run_accuracy(name, overrides)

    return run


BENCHMARKS: dict[str, Callable[..., Any]] = {
    "accuracy_camvid": _accuracy("accuracy_camvid"),
    "accuracy_synthetic": _accuracy("accuracy_synthetic"),
}
