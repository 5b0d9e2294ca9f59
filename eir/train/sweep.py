"""`launch.py sweep`: Ray Tune over experiment knobs, one trial = one whole multi-step experiment.

Under Ray Train V2 a trial is a plain driver function: it runs `run_experiment`, whose steps
each launch their own `TorchTrainer` (with their own worker placement groups), and reports to
Tune after every step ≥ 1 with `time_attr="step"`, so ASHA can stop a poor trial after a step.
Tune's per-trial resources therefore cover only that driver; how many trials run at once is
derived from the cluster's resources and what one trial's trainer and data pipeline need.

Layout: `<run.output_dir>/sweeps/<name>/` is the Tune experiment dir (restorable with --resume);
each trial's run dir is `<...>/sweeps/<name>/runs/<trial id>/`. The datasets, splits, step-0
cache and MLflow store stay shared under `run.output_dir`, so trials that agree on step 0 train
it once. MLflow: a parent run for the sweep, one nested run per trial (named by its swept values,
`memory.size=10,seed=1`, as in Tune), one nested run per step; `mlflow_sweep.json` in the sweep
dir holds the parent's id and the tracking URI.

Everything a sweep file sets is checked before Ray starts: its keys and distributions, and the
config of every combination of grid and choice values and range bounds (`check_trial_configs`).
The driver builds each of those configs once and derives everything else from them; a trial
builds its own config once, from the spec it was shipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from eir import storage
from eir.config import (
    ConfigError,
    ExperimentConfig,
    anchored_paths,
    check_name,
    load_config,
    parse_overrides,
    read_config_tree,
    read_yaml_file,
    valid_keys,
)
from eir.methods import method_class
from eir.raysession import ensure_ray, started_locally
from eir.runlock import hold
from eir.tasks import TaskError, get_task
from eir.tracking import FAILED, FINISHED, KILLED, Tracker, uri_without_credentials
from eir.train import cache
from eir.train.experiment import run_experiment, step0_cache_entry
from eir.train.resolved import resolve
from eir.train.results import step_table
from eir.train.step import worker_resources
from eir.train.sweep_state import check_saved_trials, missing_grid_points, saved_trial_params
from eir.weights import imagenet_file

log = logging.getLogger(__name__)

SWEEP_KEYS = {
    "name",
    "base",
    "overrides",
    "space",
    "num_samples",
    "metric",
    "mode",
    "scheduler",
    "max_concurrent_trials",
}
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
METRICS = ("hIoU", "mIoU_all")
# The sweep places and names each trial's run itself: sweeping these would be overwritten or scatter the shared cache.
UNSWEEPABLE = ("run.name", "run.output_dir")
# Up to this many combinations of candidate values, every one is checked as a whole trial config.
MAX_CHECKED_COMBINATIONS = 1024  # ~2 ms each
# A trial is a driver that waits on its trainers; its own reservation is a token (Tune refuses 0).
TRIAL_DRIVER_CPU = 0.1


@dataclass
class SweepSpec:
    name: str
    base: Path
    base_tree: dict[str, Any] = field(default_factory=dict)  # the base file's settings, read once
    overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the command line's key=value overrides, parsed once
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = "hIoU"
    mode: str = "max"
    scheduler: str = "fifo"
    max_concurrent_trials: int | None = None

    def config(self, params: dict[str, Any] | None = None) -> ExperimentConfig:
        """The experiment config of one trial: base ← sweep overrides ← command line ← sampled params."""
        return load_config(self.base, {**self.overrides, **self.extra, **(params or {})}, file_tree=self.base_tree)


def load_sweep(path: str | Path, extra: list[str] | None = None) -> SweepSpec:
    """Read and check a sweep file, every trial's settings included, before anything runs.

    Every error is one ConfigError naming the file, the key and what was expected.
    """
    spec = read_sweep(path, extra)
    check_trial_configs(spec, Path(path))
    return spec


def read_sweep(path: str | Path, extra: list[str] | None = None) -> SweepSpec:
    """A sweep file's settings, each checked on its own (`check_trial_configs` checks the trials)."""
    path = Path(path)
    data = read_yaml_file(path, f"sweep file {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must be a mapping of sweep keys, got {type(data).__name__}")
    unknown = sorted(map(str, set(data) - SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key(s) {unknown} in {path}; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    for required in ("name", "base", "space"):
        if required not in data:
            raise ConfigError(f"sweep file {path} lacks `{required}`")

    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"bad value {data[key]!r} for {key} in {path}: expected {expected}")

    if not isinstance(data["name"], str):
        raise bad("name", "a folder name")
    check_name(data["name"], f"name in {path}")
    if not isinstance(data["base"], str) or not data["base"]:
        raise bad("base", "the path of an experiment YAML, relative to the sweep file")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise bad("overrides", "a mapping of config keys to values (`train.epochs: 5`)")
    num_samples = data.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise bad("num_samples", "an integer >= 1 (repeats of the grid, or random samples)")
    concurrency = data.get("max_concurrent_trials")
    concurrency_ok = isinstance(concurrency, int) and not isinstance(concurrency, bool) and concurrency >= 1
    if concurrency is not None and not concurrency_ok:
        raise bad("max_concurrent_trials", "an integer >= 1, or null to derive it from the cluster's resources")
    choices = {"metric": METRICS, "mode": ("max", "min"), "scheduler": ("fifo", "asha")}
    for key, allowed in choices.items():
        if data.get(key, allowed[0]) not in allowed:
            raise ConfigError(
                f"bad value {data[key]!r} for {key} in {path}: allowed values are {', '.join(map(repr, allowed))}"
            )
    base = (path.parent / data["base"]).resolve()
    return SweepSpec(
        name=data["name"],
        base=base,
        base_tree=read_config_tree(base),
        overrides=overrides,
        extra=parse_overrides(extra or []),
        space=_checked_space(data["space"], path),
        num_samples=num_samples,
        metric=data.get("metric", "hIoU"),
        mode=data.get("mode", "max"),
        scheduler=data.get("scheduler", "fifo"),
        max_concurrent_trials=concurrency,
    )


def _checked_space(space: Any, path: Path) -> dict[str, dict[str, list]]:
    """The `space:` mapping, each key a config key with one well-formed distribution.

    An empty space is an error rather than "run the base config num_samples times": every trial
    would be the same run, seed included, so it would measure nothing (repeat over seeds with
    `seed: {grid: [0, 1, 2]}`).
    """
    if not isinstance(space, dict):
        raise ConfigError(
            f"bad value {space!r} for space in {path}: expected a mapping of config keys to distributions"
        )
    if not space:
        raise ConfigError(
            f"space in {path} is empty: a sweep needs at least one swept key "
            "(to repeat the base run over seeds, sweep `seed: {grid: [0, 1, 2]}`)"
        )
    keys = set(valid_keys())
    forms = ", ".join(f"{d}: [...]" for d in DISTRIBUTIONS)
    for key, dist in space.items():
        if key not in keys:
            raise ConfigError(
                f"space key {key!r} in {path} is not a config key (run `launch.py run --help` for the keys)"
            )
        if key in UNSWEEPABLE:
            raise ConfigError(
                f"space key {key!r} in {path} cannot be swept: the sweep names and places each trial's run itself"
            )
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"space.{key} in {path} must be one of {{{forms}}}, got {dist!r}")
        kind, values = next(iter(dist.items()))
        where = f"space.{key}.{kind} in {path}"
        if kind in ("grid", "choice"):
            if not isinstance(values, list) or not values:
                raise ConfigError(f"bad value {values!r} for {where}: expected a non-empty list of values")
            continue
        if not isinstance(values, list) or len(values) != 2:
            raise ConfigError(f"bad value {values!r} for {where}: expected [lo, hi]")
        lo, hi = values
        number = int if kind == "randint" else (int, float)
        if any(isinstance(v, bool) or not isinstance(v, number) or not math.isfinite(v) for v in values):
            kinds = "integers" if kind == "randint" else "finite numbers"
            raise ConfigError(f"bad value {values!r} for {where}: expected two {kinds}")
        if lo > hi or (lo == hi and kind != "randint"):
            raise ConfigError(f"bad value {values!r} for {where}: expected lo {'<=' if kind == 'randint' else '<'} hi")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"bad value {values!r} for {where}: expected 0 < lo (a log scale)")
    return space


def _candidates(dist: dict[str, list]) -> list[Any]:
    """The values of a distribution a trial can get that can be checked up front: every grid or
    choice value, and both bounds of a range (as floats for uniform and loguniform, which is what
    Tune samples: an integer key then fails here rather than in a trial)."""
    kind, values = next(iter(dist.items()))
    if kind in ("uniform", "loguniform"):
        return [float(v) for v in values]
    return list(values)


def check_trial_configs(spec: SweepSpec, path: Path) -> list[ExperimentConfig]:
    """Build the config of every combination of candidate values, so a bad one fails before Tune starts;
    the configs, each built once (the first is the first combination's).

    Beyond `MAX_CHECKED_COMBINATIONS`, each value is checked with the other keys at their first
    value instead (a cross-key conflict then surfaces in its trial).
    """
    return [config for _, config in checked_trials(spec, path)]


def checked_trials(spec: SweepSpec, path: Path) -> list[tuple[dict[str, Any], ExperimentConfig]]:
    """(params, config) of every combination `check_trial_configs` checks, in the sweep file's order."""
    keys = list(spec.space)
    options = [_candidates(spec.space[key]) for key in keys]
    if math.prod(map(len, options)) <= MAX_CHECKED_COMBINATIONS:
        combinations = itertools.product(*options)
    else:
        firsts = [values[0] for values in options]
        combinations = ((*firsts[:i], value, *firsts[i + 1 :]) for i, values in enumerate(options) for value in values)
    configs = []
    for combination in combinations:
        params = dict(zip(keys, combination, strict=True))
        try:
            configs.append((params, spec.config(params)))
        except ConfigError as exc:
            raise ConfigError(f"sweep file {path}, trial {trial_label(params)}: {exc}") from exc
    return configs


def trial_label(params: dict[str, Any]) -> str:
    """A trial's name from its swept values, e.g. `memory.size=10,seed=1`: Tune's trial name, the
    trial's run name in MLflow, and part of its Tune folder, so only file-name-safe characters."""
    text = ",".join(
        f"{key}={f'{value:.4g}' if isinstance(value, float) else value}" for key, value in sorted(params.items())
    )
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text) or "trial"
    if len(safe) > 120:  # long lists or many keys: cut, and keep names of different trials apart
        safe = f"{safe[:111]}~{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return safe


def _tune_trial_name(trial: Any) -> str:
    return trial_label(trial.config)


def _tune_trial_dirname(trial: Any) -> str:
    return f"{trial_label(trial.config)}_{trial.trial_id}"  # the id keeps repeats of one setting apart


def search_space(spec: SweepSpec) -> dict[str, Any]:
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
    scaling = config.scaling
    per_worker = worker_resources(scaling.cpus_per_worker, scaling.use_gpu, scaling.worker_resource)
    demand = {kind: scaling.num_workers * amount for kind, amount in per_worker.items()}
    return {**demand, "CPU": demand["CPU"] + config.data.num_cpus_per_worker, "GPU": demand.get("GPU", 0.0)}


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


def sweep_dir(config: ExperimentConfig, spec: SweepSpec) -> storage.Location:
    return storage.resolve(config.run.output_dir).join("sweeps", spec.name)


def run_sweep(path: str | Path, extra: list[str] | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) a sweep; returns the summary written to `<sweep dir>/summary.json`.

    A sweep stopped by an error or Ctrl-C ends its MLflow runs (parent, trials, steps) as FAILED
    or KILLED rather than leaving them RUNNING.
    """
    started = time.perf_counter()
    spec = read_sweep(path, extra)
    configs = check_trial_configs(spec, Path(path))  # a bad sweep fails before Ray starts
    first = configs[0]  # run.output_dir cannot be swept: every trial's is this one's
    # Trials run in their own working directories: relative paths are pinned to this one.
    spec.extra.update(anchored_paths(first, Path.cwd()))
    folder = sweep_dir(first, spec)
    # Before Ray: one clear error, not one failed trial each.
    for backbone in sorted({c.model.backbone for c in configs if c.model.weights == "imagenet"}):
        imagenet_file(backbone)

    with hold(folder):  # one live sweep per sweep folder (its Tune state, mlflow_sweep.json)
        saved = saved_trial_params(folder) if resume else None
        if saved is not None:  # before Ray: restoring trials the file does not produce would run them
            check_saved_trials(saved[1], spec.space, spec.num_samples, saved[0], str(path))
        ensure_ray()
        tracker = Tracker(storage.resolve(first.run.output_dir), f"eir-sweep-{spec.name}")
        parent = _start_parent(spec, tracker, folder.join("mlflow_sweep.json"))
        try:
            grid = _fit(spec, configs, folder, tracker.uri, parent, resume)
        except BaseException as exc:
            tracker.close_tree(parent, KILLED if isinstance(exc, KeyboardInterrupt) else FAILED)
            raise
        summary = summarize(spec, grid, folder) | {"wall_s": round(time.perf_counter() - started, 1)}
        best = summary.get("best")
        tracker.metrics(parent, {f"best_{spec.metric}": best["metric"]} if best else {})
        tracker.tags(parent, {"best_trial": best["name"] if best else "none"})
        if best:
            tracker.params(parent, {f"best.{k}": v for k, v in best["params"].items()})
        tracker.finish(parent, FAILED if summary["failed"] or summary["missing"] else FINISHED)
        storage.write_json_atomic(folder.join("summary.json"), summary)
    print(summary_table(summary))
    return summary


def dry_run_sweep(path: str | Path, extra: list[str] | None = None) -> dict[str, Any]:
    """`launch.py sweep --dry-run`: what the sweep would run, training nothing and starting no Ray.

    Every trial config is checked as `run_sweep` checks it, the dataset's splits are prepared (as
    `run --dry-run` does: the step table needs them) and each trial is resolved to the step-0 cache
    entry it would use, so the listing says which trials train a step 0 and which take one from the
    cache (one per loss family and seed in a method sweep). For a space that samples (choice, ranges)
    the listing is the candidate combinations checked, not the trials Tune will draw.
    """
    spec = read_sweep(path, extra)
    trials = checked_trials(spec, Path(path))
    folder = sweep_dir(trials[0][1], spec)
    print(
        f"dry run of sweep {spec.name}: nothing is trained and Ray is not started; the dataset's splits are "
        f"prepared in {storage.resolve(trials[0][1].run.output_dir).join('datasets').uri} if they are not there yet"
    )
    rows: list[dict[str, Any]] = []
    shown = None  # the step table of the first incremental trial (a joint trial has one step)
    trainer: dict[str, str] = {}  # step-0 cache entry -> the first trial that uses it
    for params, config in trials:
        config.run.name = trial_label(params)
        exp = resolve(config, progress=False, run_dir=folder.join("runs", config.run.name))
        if shown is None or (shown.is_joint and not exp.is_joint):
            shown = exp
        entry = step0_cache_entry(exp)
        if entry is None:
            step0 = "none (one joint step)"
        elif cache.lookup(entry):
            step0 = "in the cache"
        else:
            step0 = f"shared with {trainer[entry.uri]}" if entry.uri in trainer else "trains"
            trainer.setdefault(entry.uri, config.run.name)
        rows.append({"name": config.run.name, "params": params, "step0": step0})
    print(step_table(shown.facts, shown.train_manifest.info.class_names))
    sampled = any("grid" not in dist for dist in spec.space.values())
    what = "candidate combinations (Tune samples its trials from these)" if sampled else "trials"
    print(f"{len(rows)} {what}, every config checked; sweep dir {folder.uri}")
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        print(f"  {row['name']:<{width}}  step 0 {row['step0']}")
    trained = sum(row["step0"] == "trains" for row in rows)
    # Tune's order may differ from the listing's: whichever trial of a group starts first trains, the others wait.
    print(f"step 0 trained {trained}× for {len(rows)} {what}")
    return {"sweep": spec.name, "trials": rows, "step0_trained": trained, "dir": folder.uri}


def _start_parent(spec: SweepSpec, tracker: Any, ids_loc: storage.Location) -> str:
    """The sweep's MLflow parent run (the recorded one when the sweep ran before), its id and the
    tracking URI recorded in `mlflow_sweep.json`, so `launch.py report` finds it without
    MLFLOW_TRACKING_URI. A password in the URI is not written down (MLflow reads credentials from
    MLFLOW_TRACKING_USERNAME/PASSWORD as well)."""
    recorded = _read_ids(ids_loc)
    uri = uri_without_credentials(tracker.uri)
    if recorded.get("tracking_uri", uri) != uri:
        raise ConfigError(
            f"sweep {spec.name} was tracked at MLflow {recorded['tracking_uri']} ({ids_loc.uri}), "
            f"this invocation tracks at {uri}: "
            f"set MLFLOW_TRACKING_URI={recorded['tracking_uri']} to continue it"
        )
    description = (
        f"Sweep `{spec.name}` over {', '.join(f'`{key}`' for key in spec.space)} from `{spec.base.name}`; "
        f"{spec.metric} ({spec.mode}). Select the trial runs below and press Compare."
    )
    parent = tracker.start(
        spec.name, run_id=recorded.get("parent"), tags={"eir.sweep": spec.name}, description=description
    )
    storage.write_json_atomic(ids_loc, {"parent": parent, "tracking_uri": uri})
    tracker.params(
        parent,
        {f"space.{k}": str(v) for k, v in spec.space.items()}
        | {"base": str(spec.base), "num_samples": spec.num_samples, "metric": spec.metric, "scheduler": spec.scheduler},
    )
    return parent


def _read_ids(ids_loc: storage.Location) -> dict[str, Any]:
    """`mlflow_sweep.json` of an earlier invocation ({} for a new sweep); damage is a ConfigError naming it."""
    if not storage.exists(ids_loc):
        return {}
    remedy = "remove it to give the sweep a new MLflow parent run"
    try:
        ids = json.loads(storage.read_bytes(ids_loc).decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON
        raise ConfigError(f"{ids_loc.uri} is damaged (not JSON: {exc}); {remedy}") from exc
    if not isinstance(ids, dict) or not isinstance(ids.get("parent"), str):
        raise ConfigError(f'{ids_loc.uri} is damaged (expected {{"parent": <run id>, "tracking_uri": ...}}); {remedy}')
    return ids


def _fit(
    spec: SweepSpec,
    configs: list[ExperimentConfig],
    folder: storage.Location,
    tracking_uri: str,
    parent: str,
    resume: bool,
) -> Any:
    """Build (or restore) the Tuner and run every trial; Tune's ResultGrid.

    `configs`: the checked trial configs. Concurrency fits the most demanding of them, ASHA's
    horizon the longest.
    """
    resources, cores = ray.cluster_resources(), os.cpu_count() if started_locally() else None
    concurrency = spec.max_concurrent_trials or min(default_concurrency(c, resources, cores) for c in configs)
    scheduler = (
        ASHAScheduler(
            time_attr="step", max_t=max(1, max(map(_num_steps, configs)) - 1), grace_period=1, reduction_factor=2
        )
        if spec.scheduler == "asha"
        else FIFOScheduler()
    )
    trainable = tune.with_resources(_make_trial(spec, folder.uri, tracking_uri, parent), {"CPU": TRIAL_DRIVER_CPU})
    log.info(
        "sweep %s: %s trials at most %d at a time, metric %s (%s), dir %s",
        spec.name,
        "grid" if all("grid" in d for d in spec.space.values()) else f"{spec.num_samples} samples ×",
        concurrency,
        spec.metric,
        spec.mode,
        folder.uri,
    )
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
                trial_name_creator=_tune_trial_name,
                trial_dirname_creator=_tune_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                **storage.ray_storage(folder.parent),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    return tuner.fit()


def _num_steps(config: ExperimentConfig) -> int:
    if method_class(config.method.name).joint:
        return 1
    try:
        return get_task(config.dataset.name, config.task.name, config.task.setting).num_steps
    except TaskError:  # a folder dataset needs its class count; ASHA then gets a generous horizon
        return 100


def _make_trial(spec: SweepSpec, folder_uri: str, tracking_uri: str, parent: str):
    """The Tune trainable: the spec travels with it (checked on the driver; nothing is re-read)."""

    def trial(params: dict[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
        trial_id = tune.get_context().get_trial_id()
        config = spec.config(dict(params))
        joint = method_class(config.method.name).joint
        config.run.name = trial_label(dict(params))  # its MLflow run's name; the run dir stays runs/<trial id>
        run_dir = storage.resolve(folder_uri).join("runs", trial_id)

        def report(step: int, row: dict[str, Any]) -> None:
            if step == 0 and not joint:
                return  # step 0 has no new classes: nothing to compare trials on yet
            tune.report(
                {
                    "step": step,
                    "hIoU": row["hIoU"] or 0.0,
                    "mIoU_all": row["mIoU_all"] or 0.0,
                    "mIoU_old": row["mIoU_old"] or 0.0,
                    "mIoU_new": row["mIoU_new"] or 0.0,
                    "step0_source": row["source"] if step == 0 else "",
                }
            )

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
            error = f"{type(result.error).__name__}: {result.error}"
            failed.append({"name": trial_label(params), "params": params, "error": error})
            continue
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", "?")
        loc = folder.join("runs", trial_id, "results.json")
        document = storage.read_json(loc) if storage.exists(loc) else None
        trials.append(
            {
                "trial_id": trial_id,
                "name": trial_label(params),
                "params": params,
                "metric": metrics.get(spec.metric),
                "last_step": metrics.get("step"),
                "time_total_s": metrics.get("time_total_s"),  # Tune's: summed over restores
                "status": document["status"] if document else "stopped early",
                "step0": document["steps"][0]["source"] if document else None,
                "run_dir": folder.join("runs", trial_id).uri,
            }
        )
    missing = missing_grid_points([t["params"] for t in trials + failed], spec.space, spec.num_samples)
    if missing:
        log.error("sweep %s: %d grid point(s) never ran: %s", spec.name, len(missing), missing)
    ranked = [t for t in trials if t["metric"] is not None]
    best = (max if spec.mode == "max" else min)(ranked, key=lambda t: t["metric"]) if ranked else None
    return {
        "sweep": spec.name,
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": trials,
        "failed": failed,
        "missing": missing,
        "best": best,
        "step0_trained": sum(t["step0"] == "trained" for t in trials),
        "step0_reused": sum(t["step0"] == "cache" for t in trials),
        "dir": folder.uri,
    }


def summary_table(summary: dict[str, Any]) -> str:
    lines = [
        (
            f"sweep {summary['sweep']}: {len(summary['trials'])} trials finished, {len(summary['failed'])} failed; "
            f"step 0 trained {summary['step0_trained']}×, reused {summary['step0_reused']}×; "
            f"wall {summary['wall_s'] / 60:.1f} min (this invocation)"
        )
    ]
    for trial in sorted(summary["trials"], key=lambda t: -(t["metric"] or -1e9)):
        lines.append(
            f"  {trial['name']}  {summary['metric']}={trial['metric']}  ({trial['status']}, trial {trial['trial_id']})"
        )
    for failure in summary["failed"]:
        lines.append(f"  FAILED {failure['name']}: {failure['error']}")
    for params in summary["missing"]:
        lines.append(f"  MISSING {trial_label(params)}: no trial ran this grid point")
    return "\n".join(lines)
