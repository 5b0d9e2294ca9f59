"""`sweep_cache`: the wall time of one sweep with the step-0 cache and with it disabled.

The trials of a sweep over incremental knobs share step 0; with the cache one trial trains it
while the others wait on the writer lock and then reuse it, without it every trial trains its
own. Both sweeps start from an empty output dir (so the cached sweep pays for its one step 0),
in the same Ray instance, the cached one first (it pays Ray's warm-up, which biases the ratio
against the cache). Key: `cache_speedup` = wall(no cache) / wall(cache).
Full: experiments/benchmarks/sweep_cache.yaml (4 trials, 2 at a time); quick:
experiments/benchmarks/sweep_cache_quick.yaml (2 trials).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from eir.bench.common import environment, results_path, write_results
from eir.train.sweep import run_sweep
from eir.visualize import hbar_figure

REPO = Path(__file__).resolve().parents[2]


def run_sweep_cache(quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    sweep = REPO / "experiments" / "benchmarks" / ("sweep_cache_quick.yaml" if quick else "sweep_cache.yaml")
    results: dict[str, dict[str, Any]] = {}
    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)  # keep the benchmark's runs out of the user's store
    try:
        with tempfile.TemporaryDirectory() as folder:
            for name, extra in (("cache", []), ("no_cache", ["run.step0_cache=false"])):
                started = time.perf_counter()
                summary = run_sweep(sweep, [f"run.output_dir={Path(folder) / name}", *extra, *(overrides or [])])
                wall = time.perf_counter() - started
                results[name] = {
                    "wall_s": round(wall, 1),
                    "trials": len(summary["trials"]),
                    "failed": len(summary["failed"]),
                    "step0_trained": summary["step0_trained"],
                    "step0_reused": summary["step0_reused"],
                }
                print(
                    f"{name:9s} {wall:7.1f} s  {len(summary['trials'])} trials, step 0 trained "
                    f"{summary['step0_trained']}×, reused {summary['step0_reused']}×"
                )
    finally:
        if saved_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    if any(r["failed"] for r in results.values()):
        raise RuntimeError(f"sweep_cache: a trial failed, the timing means nothing: {results}")
    document = {
        "benchmark": "sweep_cache",
        "quick": quick,
        "cache_speedup": round(results["no_cache"]["wall_s"] / results["cache"]["wall_s"], 4),
        **environment(),
        "config": {"sweep": str(sweep.relative_to(REPO)), "overrides": overrides or []},
        "results": results,
    }
    path = results_path("sweep_cache", quick)
    write_results(path, document)
    hbar_figure(
        {
            f"step-0 cache (trained {results['cache']['step0_trained']}×)": results["cache"]["wall_s"],
            f"no cache (trained {results['no_cache']['step0_trained']}×)": results["no_cache"]["wall_s"],
        },
        path.with_suffix(".png"),
        xlabel="sweep wall time (s)",
        colors=["#55a868", "#8c8c8c"],
        title=f"{results['cache']['trials']}-trial sweep: cache_speedup {document['cache_speedup']}",
    )
    print(f"cache_speedup = {document['cache_speedup']}  → {path}")
    return document
