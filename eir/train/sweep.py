"""`launch.py sweep`: Ray Tune over experiment knobs, one trial = one whole multi-step experiment.

Under Ray Train V2 a trial is a plain driver function: it runs `run_experiment`, whose steps
each launch their own `TorchTrainer` (with their own worker placement groups), and reports to
Tune after every step ≥ 1 with `time_attr="step"`, so ASHA can stop a poor trial after a step.
Tune's per-trial resources therefore cover only that driver; how many trials run at once is
derived from the cluster's resources and what one trial's trainer and data pipeline need.

Layout: `<run.output_dir>/sweeps/<name>/` is the Tune experiment dir (restorable with --resume);
each trial's run dir is `<...>/sweeps/<name>/runs/<trial id>/`. The datasets, splits, step-0
cache and MLflow store stay shared under `run.output_dir`, so trials that agree on step 0 train
it once. MLflow: a parent run for the sweep, one nested run per trial, one nested run per step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eir import storage
from eir.config import ConfigError, ExperimentConfig, anchored_paths, load_config, parse_overrides, valid_keys

log = logging.getLogger(__name__)

SWEEP_KEYS = {"name", "base", "overrides", "space", "num_samples", "metric", "mode", "scheduler", "max_concurrent_trials"}
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = ("hIoU", "mIoU_all")
# A trial is a driver that waits on its trainers; its own reservation is a token (Tune refuses 0).
TRIAL_DRIVER_CPU = 0.1


@dataclass
class SweepSpec:
    name: str
    base: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = "hIoU"
    mode: str = "max"
    scheduler: str = "fifo"
    max_concurrent_trials: int | None = None

    def config(self, params: dict[str, Any] | None = None, extra: list[str] | None = None) -> ExperimentConfig:
        """The experiment config of one trial: base ← sweep overrides ← command line ← sampled params."""
        updates = dict(self.overrides)
        updates.update(parse_overrides(extra or []))
        updates.update(params or {})
        return load_config(self.base, updates)


def load_sweep(path: str | Path, extra: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep file; every error names the key and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must be a mapping")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown} in {path}; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    for required in ("name", "base", "space"):
        if required not in data:
            raise ConfigError(f"sweep file {path} lacks `{required}`")
    spec = SweepSpec(
        name=str(data["name"]),
        base=(path.parent / data["base"]).resolve(),
        overrides=dict(data.get("overrides") or {}),
        space=dict(data["space"]),
        num_samples=int(data.get("num_samples", 1)),
        metric=str(data.get("metric", "hIoU")),
        mode=str(data.get("mode", "max")),
        scheduler=str(data.get("scheduler", "fifo")),
        max_concurrent_trials=data.get("max_concurrent_trials"),
    )
    if spec.metric not in METRICS:
        raise ConfigError(f"bad value {spec.metric!r} for metric in {path}: allowed values are {', '.join(METRICS)}")
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"bad value {spec.mode!r} for mode in {path}: allowed values are 'max', 'min'")
    if spec.scheduler not in ("fifo", "asha"):
        raise ConfigError(f"bad value {spec.scheduler!r} for scheduler in {path}: allowed values are 'fifo', 'asha'")
    keys = set(valid_keys())
    for key, dist in spec.space.items():
        if key not in keys:
            raise ConfigError(f"space key {key!r} in {path} is not a config key (run `launch.py run --help` for the keys)")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"space.{key} in {path} must be one of {{{', '.join(f'{d}: [...]' for d in DISTRIBUTIONS)}}}, got {dist!r}")
        kind, values = next(iter(dist.items()))
        if kind in ("uniform", "loguniform", "randint") and (not isinstance(values, list) or len(values) != 2):
            raise ConfigError(f"space.{key}.{kind} in {path} needs [lo, hi], got {values!r}")
        probe = values[0] if isinstance(values, list) and values else values
        spec.config({key: probe}, extra)  # a value the config rejects fails now, not in a trial
    spec.config(None, extra)
    return spec


def search_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    makers = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),
    }
    return {key: makers[kind](values) for key, dist in spec.space.items() for kind, values in dist.items()}


def trial_demand(config: ExperimentConfig) -> dict[str, float]:
    """What one trial occupies while it trains: its Train workers plus its data tasks."""
    cpus = config.scaling.num_workers * config.scaling.cpus_per_worker + config.data.num_cpus_per_worker
    return {"CPU": cpus, "GPU": float(config.scaling.num_workers) if config.scaling.use_gpu else 0.0}


def default_concurrency(config: ExperimentConfig, resources: dict[str, float], cores: int | None = None) -> int:
    """Trials that fit side by side in the cluster without starving each other's trainers.

    `cores` caps the CPUs counted: a private local Ray has more logical CPUs than the machine has
    cores (so trials, trainers and data tasks can all be scheduled), and two CamVid trials on 2
    cores measured 1.7 img/s each against ~10 img/s for one alone.
    """
    demand = trial_demand(config)
    if cores is not None:
        resources = {**resources, "CPU": min(resources.get("CPU", 0.0), float(cores))}
    fits = [math.floor(resources.get(kind, 0.0) / need) for kind, need in demand.items() if need > 0]
    return max(1, min(fits)) if fits else 1


def sweep_dir(spec: SweepSpec, extra: list[str] | None = None) -> storage.Location:
    return storage.resolve(spec.config(None, extra).run.output_dir).join("sweeps", spec.name)


def run_sweep(path: str | Path, extra: list[str] | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) a sweep; returns the summary written to `<sweep dir>/summary.json`."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from eir.raysession import ensure_ray, started_locally
    from eir.tracking import Tracker

    started = time.perf_counter()
    spec = load_sweep(path, extra)
    # Trials run in their own working directories: relative paths are pinned to this one.
    extra = [*(extra or []), *(f"{k}={v}" for k, v in anchored_paths(spec.config(None, extra), Path.cwd()).items())]
    base = spec.config(None, extra)
    output_root = storage.resolve(base.run.output_dir)
    folder = sweep_dir(spec, extra)
    ensure_ray()
    tracker = Tracker(output_root, f"eir-sweep-{spec.name}")
    ids_loc = folder.join("mlflow_sweep.json")
    parent_id = storage.read_json(ids_loc)["parent"] if storage.exists(ids_loc) else None
    parent = tracker.start(spec.name, run_id=parent_id, tags={"eir.sweep": spec.name})
    storage.write_json_atomic(ids_loc, {"parent": parent})
    tracker.params(parent, {f"space.{k}": str(v) for k, v in spec.space.items()} | {
        "base": str(spec.base), "num_samples": spec.num_samples, "metric": spec.metric, "scheduler": spec.scheduler})

    concurrency = spec.max_concurrent_trials or default_concurrency(
        base, ray.cluster_resources(), cores=os.cpu_count() if started_locally() else None)
    num_steps = _num_steps(base)
    scheduler = (
        ASHAScheduler(time_attr="step", max_t=max(1, num_steps - 1), grace_period=1, reduction_factor=2)
        if spec.scheduler == "asha"
        else FIFOScheduler()
    )
    trainable = tune.with_resources(
        _make_trial(str(Path(path).resolve()), extra, folder.uri, tracker.uri, tracker.experiment_id, parent),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    log.info("sweep %s: %s trials at most %d at a time, metric %s (%s), dir %s", spec.name,
             "grid" if all("grid" in d for d in spec.space.values()) else f"{spec.num_samples} samples ×", concurrency,
             spec.metric, spec.mode, folder.uri)
    if resume and tune.Tuner.can_restore(folder.uri):
        tuner = tune.Tuner.restore(folder.uri, trainable=trainable, resume_errored=True, restart_errored=False)
    else:
        if resume:
            log.warning("--resume: no restorable sweep at %s; starting it", folder.uri)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=tune.TuneConfig(
                num_samples=spec.num_samples,
                metric=spec.metric,
                mode=spec.mode,
                scheduler=scheduler,
                max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                **storage.ray_storage(folder.parent),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    grid = tuner.fit()
    summary = summarize(spec, grid, folder) | {"wall_s": round(time.perf_counter() - started, 1)}
    best = summary.get("best")
    tracker.metrics(parent, {f"best_{spec.metric}": best["metric"]} if best else {})
    tracker.tags(parent, {"best_trial": best["trial_id"] if best else "none"})
    if best:
        tracker.params(parent, {f"best.{k}": v for k, v in best["params"].items()})
    tracker.finish(parent, ok=not summary["failed"])
    storage.write_json_atomic(folder.join("summary.json"), summary)
    print(summary_table(summary))
    return summary


def _num_steps(config: ExperimentConfig) -> int:
    from eir.tasks import get_task

    if config.method.name == "joint":
        return 1
    try:
        return get_task(config.dataset.name, config.task.name, config.task.setting).num_steps
    except Exception:  # a folder dataset needs its class count; ASHA then gets a generous horizon
        return 100


def _make_trial(path: str, extra: list[str], folder_uri: str, tracking_uri: str, experiment_id: str, parent: str):
    def trial(params: dict[str, Any]) -> None:
        from ray import tune

        from eir.train.experiment import run_experiment

        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
        spec = load_sweep(path, extra)
        trial_id = tune.get_context().get_trial_id()
        config = spec.config(dict(params), extra)
        config.run.name = f"trial_{trial_id}"
        run_dir = storage.resolve(folder_uri).join("runs", trial_id)

        def report(step: int, row: dict[str, Any]) -> None:
            if step == 0 and config.method.name != "joint":
                return  # step 0 has no new classes: nothing to compare trials on yet
            tune.report({"step": step, "hIoU": row["hIoU"] or 0.0, "mIoU_all": row["mIoU_all"] or 0.0,
                         "mIoU_old": row["mIoU_old"] or 0.0, "mIoU_new": row["mIoU_new"] or 0.0,
                         "step0_source": row["source"] if step == 0 else ""})

        run_experiment(
            config,
            resume=storage.exists(run_dir.join("config.yaml")),
            reporter=report,
            progress=False,
            run_dir=run_dir,
            mlflow_experiment=f"eir-sweep-{spec.name}",
            mlflow_parent=parent,
        )

    return trial


def summarize(spec: SweepSpec, grid: Any, folder: storage.Location) -> dict[str, Any]:
    """Per trial: params, final metric, status and where step 0 came from; the best trial; failures."""
    trials, failed = [], []
    for result in grid:
        params = dict(result.config or {})
        if result.error is not None:
            failed.append({"params": params, "error": f"{type(result.error).__name__}: {result.error}"})
            continue
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", "?")
        loc = folder.join("runs", trial_id, "results.json")
        document = storage.read_json(loc) if storage.exists(loc) else None
        trials.append({
            "trial_id": trial_id,
            "params": params,
            "metric": metrics.get(spec.metric),
            "last_step": metrics.get("step"),
            "time_total_s": metrics.get("time_total_s"),  # Tune's: summed over restores
            "status": document["status"] if document else "stopped early",
            "step0": document["steps"][0]["source"] if document else None,
            "run_dir": folder.join("runs", trial_id).uri,
        })
    ranked = [t for t in trials if t["metric"] is not None]
    best = (max if spec.mode == "max" else min)(ranked, key=lambda t: t["metric"]) if ranked else None
    return {
        "sweep": spec.name, "metric": spec.metric, "mode": spec.mode, "trials": trials, "failed": failed, "best": best,
        "step0_trained": sum(t["step0"] == "trained" for t in trials),
        "step0_reused": sum(t["step0"] == "cache" for t in trials),
        "dir": folder.uri,
    }


def summary_table(summary: dict[str, Any]) -> str:
    lines = [f"sweep {summary['sweep']}: {len(summary['trials'])} trials finished, {len(summary['failed'])} failed; "
             f"step 0 trained {summary['step0_trained']}×, reused {summary['step0_reused']}×; "
             f"wall {summary['wall_s'] / 60:.1f} min (this invocation)"]
    for trial in sorted(summary["trials"], key=lambda t: -(t["metric"] or -1e9)):
        lines.append(f"  {trial['trial_id']}  {summary['metric']}={trial['metric']}  {trial['params']}  ({trial['status']})")
    for failure in summary["failed"]:
        lines.append(f"  FAILED {failure['params']}: {failure['error']}")
    return "\n".join(lines)
