"""The experiment driver: steps 0..T of one task, evaluated after every step, logged to MLflow.

For each step the driver resolves a `StepPlan`, builds the step's Ray Data streams, runs one
Ray Train `TorchTrainer`, reduces the confusion matrix to METHOD.md §1's scores, and writes
`step_<t>/` (model.pt, metrics.json, plan.json, then `_COMPLETE` last). A finished step is
never run again: `--resume` skips it and continues the unfinished one from its last epoch
checkpoint (Ray Train restores it from `step_<t>/train/`). Step 0 comes from the step-0 cache
when an earlier run trained it under the same settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eir import storage
from eir.config import ConfigError, ExperimentConfig, config_from_yaml, dump_yaml, inactive_keys
from eir.data.ingest import Manifest
from eir.data.prepare import ensure_prepared
from eir.data.splits import StepSplits, step_splits
from eir.methods import method_class
from eir.metrics import StepScores, mean_over_steps, reduce_scores
from eir.storage import Location
from eir.tasks import Task, get_task
from eir.train import cache
from eir.train.plan import StepPlan

if TYPE_CHECKING:
    from eir.runlock import Lease

log = logging.getLogger(__name__)

Reporter = Callable[[int, dict[str, Any]], None]
# Per-epoch values a step logs to MLflow, besides the loss and its terms ("loss_<term>").
EPOCH_METRICS = ("lr", "images_per_s", "data_wait_share")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists without --resume, config differs)."""


@functools.cache
def git_sha() -> str:
    """The commit of the code this process imported (read once: a later commit does not change it)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class ChannelSpace:
    """Class ids ↔ model channels. Channels follow step order (channel = class id in natural order).

    With an explicit class order the ids of a step are not contiguous; every label map is
    moved to channel space by a LUT before it reaches the model or the metric.
    """

    class_of_channel: tuple[int, ...]  # index = channel; [0] = 0

    @classmethod
    def of(cls, task: Task) -> ChannelSpace:
        return cls((0, *[c for step in task.steps for c in step]))

    @property
    def lut(self) -> np.ndarray:
        table = np.zeros(256, dtype=np.uint8)
        for channel, class_id in enumerate(self.class_of_channel):
            table[class_id] = channel
        table[255] = 255
        return table

    def map_lut(self, class_lut: np.ndarray) -> np.ndarray:
        """A class-valued LUT (e.g. Task.train_lut) turned into a channel-valued one."""
        return self.lut[class_lut]


@dataclass
class Experiment:
    """Everything resolved before training: data, task, splits, channel space."""

    config: ExperimentConfig
    output_root: Location
    run_dir: Location
    train_manifest: Manifest
    test_manifest: Manifest
    task: Task  # the task as evaluated
    schedule: Task  # the task as trained (task.joint() for the joint baseline)
    channels: ChannelSpace
    train_splits: StepSplits
    test_splits: StepSplits
    progress: bool = True  # progress bars (off in sweeps and tests)

    @property
    def is_joint(self) -> bool:
        return method_class(self.config.method.name).joint

    def eval_step(self, step: int) -> int:
        """The task step whose test protocol scores this schedule step (joint: the final step)."""
        return self.task.num_steps - 1 if self.is_joint else step

    @property
    def checksums(self) -> dict[str, str]:
        return {"train_split_checksum": self.train_splits.checksum, "test_split_checksum": self.test_splits.checksum}

    def row(self, step: int, scores: StepScores, source: str) -> dict[str, Any]:
        return step_row(
            step,
            scores,
            class_names=self.train_manifest.info.class_names,
            channels=self.channels,
            seen_classes=self.task.classes_seen(self.eval_step(step)),
            train_images=self.train_splits.counts[step],
            source=source,
        )

    def groups(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Old (C_0) and new (C_1..C_t) channels of the evaluated step."""
        eval_step = self.eval_step(step)
        n_old = len(self.task.steps[0])
        n_seen = len(self.task.classes_seen(eval_step))
        return tuple(range(1, n_old + 1)), tuple(range(n_old + 1, n_seen + 1))


def resolve(config: ExperimentConfig, *, progress: bool = True, run_dir: Location | None = None) -> Experiment:
    root = storage.resolve(config.run.output_dir)
    data = config.dataset
    synthetic = (data.synthetic_num_images, data.synthetic_image_size, data.synthetic_seed)
    train_manifest = ensure_prepared(data.name, data.root, data.train_split, root, image_scale=data.image_scale, synthetic=synthetic, progress=progress)
    test_manifest = ensure_prepared(data.name, data.root, data.test_split, root, image_scale=data.image_scale, synthetic=synthetic, progress=progress)
    info = train_manifest.info
    task = get_task(
        data.name,
        config.task.name,
        config.task.setting,
        num_classes=info.num_classes,
        class_order=config.task.class_order,
        future_label=info.future_label,
    )
    schedule = task.joint() if method_class(config.method.name).joint else task
    return Experiment(
        config=config,
        output_root=root,
        run_dir=run_dir or root.join(config.run.name),
        train_manifest=train_manifest,
        test_manifest=test_manifest,
        task=task,
        schedule=schedule,
        channels=ChannelSpace.of(task),
        train_splits=step_splits(schedule, train_manifest, root, purpose="train"),
        test_splits=step_splits(task, test_manifest, root, purpose="test"),
        progress=progress,
    )


def step_table(exp: Experiment) -> str:
    names = exp.train_manifest.info.class_names
    lines = [f"{'step':>4}  {'train imgs':>10}  {'test imgs':>9}  classes"]
    for step in range(exp.schedule.num_steps):
        classes = exp.schedule.classes_learned(step)
        shown = ", ".join(names[c] for c in classes[:8]) + (f", … (+{len(classes) - 8})" if len(classes) > 8 else "")
        test_count = len(exp.test_splits.ids[exp.eval_step(step)])
        lines.append(f"{step:>4}  {exp.train_splits.counts[step]:>10}  {test_count:>9}  {shown}")
    return "\n".join(lines)


def scores_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: float | None) -> str:
        return "   –  " if value is None else f"{value:6.2f}"

    lines = [f"{'step':>4}  {'all':>6}  {'old':>6}  {'new':>6}  {'hIoU':>6}  source"]
    for row in rows:
        lines.append(
            f"{row['step']:>4}  {fmt(row['mIoU_all'])}  {fmt(row['mIoU_old'])}  {fmt(row['mIoU_new'])}  "
            f"{fmt(row['hIoU'])}  {row.get('source', 'trained')}"
        )
    return "\n".join(lines)


def config_differences(previous: ExperimentConfig, current: ExperimentConfig) -> list[str]:
    """Keys whose values differ and matter to at least one of the two configs."""
    before, after = _normalised(previous.flat()), _normalised(current.flat())
    # run.name names the folder (or, in a sweep, the trial's label): it cannot change what the run computes.
    ignored = (inactive_keys(previous) & inactive_keys(current)) | {"run.name"}
    return sorted(key for key in after if key not in ignored and before.get(key) != after[key])


PATH_KEYS = ("dataset.root", "run.output_dir")


def _normalised(flat: dict[str, Any]) -> dict[str, Any]:
    """Local paths compared by where they point (`outputs` from the repo = `/repo/outputs`)."""
    return {k: (os.path.abspath(v) if k in PATH_KEYS and v and "://" not in v else v) for k, v in flat.items()}


def read_run_config(run_dir: Location) -> ExperimentConfig:
    """The config a run dir was made with (every command that opens a run dir reads it here)."""
    loc = run_dir.join("config.yaml")
    if not storage.exists(loc):
        raise RunDirError(f"{run_dir.uri} is not a run directory (no config.yaml)")
    try:
        return config_from_yaml(storage.read_bytes(loc), where=loc.uri)
    except ConfigError as exc:
        raise RunDirError(f"the run's config is damaged: {exc}; restore {loc.uri}, or start a new run under "
                          "another run.name") from exc


def require_existing_run(exp: Experiment) -> None:
    """--resume of a mistyped name is an error (naming the close ones), never a new run."""
    if storage.exists(exp.run_dir.join("config.yaml")):
        return
    runs = [name for name in storage.list_dir(exp.output_root) if storage.exists(exp.output_root.join(name, "config.yaml"))]
    close = difflib.get_close_matches(exp.config.run.name, runs, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; runs there: {', '.join(runs[:10]) or 'none'}"
    raise RunDirError(f"--resume: there is no run {exp.config.run.name!r} in {exp.output_root.uri} "
                      f"(no {exp.run_dir.join('config.yaml').uri}){hint}")


def check_run_dir(exp: Experiment, resume: bool) -> None:
    """A new run needs a free name; --resume needs an existing run made by the same config."""
    if resume:
        require_existing_run(exp)
    if not storage.exists(exp.run_dir.join("config.yaml")):
        return
    if not resume:
        raise RunDirError(
            f"run directory {exp.run_dir.uri} already exists: pass --resume to continue it, or choose another run.name"
        )
    previous = read_run_config(exp.run_dir)
    differ = config_differences(previous, exp.config)
    if differ:
        before, after = previous.flat(), exp.config.flat()
        detail = ", ".join(f"{k} ({before.get(k)!r} → {after[k]!r})" for k in differ)
        raise RunDirError(f"--resume: {exp.run_dir.uri} was made by a different config; keys that differ: {detail}")


def step0_cache_key(exp: Experiment) -> dict[str, Any]:
    cfg = exp.config
    return cache.step0_key(
        cfg.flat(),
        train_split_checksum=exp.train_splits.checksum,
        test_split_checksum=exp.test_splits.checksum,
        step0_classes=list(exp.schedule.steps[0]),
        scaling={"num_workers": cfg.scaling.num_workers, "use_gpu": cfg.scaling.use_gpu},  # GPU: AMP
    )


def step0_cache_entry(exp: Experiment) -> Location | None:
    """Where this run's step 0 is cached; None when it is not cached (joint, or `run.step0_cache=false`)."""
    if exp.is_joint or not exp.config.run.step0_cache:
        return None
    return cache.entry(exp.output_root, step0_cache_key(exp))


def make_plan(exp: Experiment, step: int, previous_model: str | None) -> StepPlan:
    cfg = exp.config
    head_sizes = tuple(len(s) for s in exp.schedule.steps[: step + 1])
    old, new = exp.groups(step)
    incremental = step > 0
    return StepPlan(
        step=step,
        head_sizes=head_sizes,
        backbone=cfg.model.backbone,
        weights=cfg.model.weights if step == 0 else None,
        output_stride=cfg.model.output_stride,
        previous_model=previous_model,
        epochs=cfg.train.epochs_incremental if incremental else cfg.train.epochs,
        global_batch=cfg.train.batch_size,
        per_worker_batch=cfg.train.batch_size // cfg.scaling.num_workers,
        lr=cfg.train.lr_incremental if incremental else cfg.train.lr,
        momentum=cfg.train.momentum,
        weight_decay=cfg.train.weight_decay,
        num_train_rows=exp.train_splits.counts[step],
        rows_per_epoch=exp.train_splits.counts[step],
        num_eval_rows=len(exp.test_splits.ids[exp.eval_step(step)]),
        eval_batch=cfg.eval.batch_size,
        old_channels=old,
        new_channels=new,
        amp=cfg.train.amp,
        seed=cfg.seed,
        method=cfg.method.name,
        method_options=method_class(cfg.method.name).options_from(cfg.flat()),
        torch_threads=max(1, int(cfg.scaling.cpus_per_worker)),
        warmup_fraction=cfg.train.warmup_fraction,
        progress=exp.progress,
        fail_at_iteration=int(os.environ["EIR_FAIL_AT_ITERATION"]) if os.environ.get("EIR_FAIL_AT_ITERATION") else None,
        fault_marker=os.environ.get("EIR_FAULT_MARKER"),
    )


def step_row(
    step: int,
    scores: StepScores,
    *,
    class_names: tuple[str, ...],
    channels: ChannelSpace,
    seen_classes: tuple[int, ...],
    train_images: int,
    source: str,
) -> dict[str, Any]:
    """The results.json entry of one step (IoU in percent; new/hIoU None at step 0)."""
    per_class = {class_names[channels.class_of_channel[ch]]: _clean(v) for ch, v in scores.per_class_iou.items()}
    return {
        "step": step,
        "seen_classes": list(seen_classes),
        "mIoU_all": _clean(scores.mIoU_all),
        "mIoU_old": _clean(scores.mIoU_old),
        "mIoU_new": _clean(scores.mIoU_new),
        "hIoU": _clean(scores.hIoU),
        "mIoU_all_fg": _clean(scores.mIoU_all_fg),
        "mIoU_old_fg": _clean(scores.mIoU_old_fg),
        "per_class_IoU": per_class,
        "train_images": train_images,
        "source": source,
    }


def _clean(value: float | None) -> float | None:
    return None if value is None or value != value else round(float(value), 4)


def results_document(
    config: ExperimentConfig, rows: list[dict[str, Any]], status: str, checksums: dict[str, str]
) -> dict[str, Any]:
    """The results.json document; `checksums` names the data splits the numbers come from."""
    alls = [r["mIoU_all"] for r in rows if r["mIoU_all"] is not None]
    return {
        "status": status,
        "method": config.method.name,
        "dataset": config.dataset.name,
        "task": config.task.name,
        "task_setting": config.task.setting,
        "seed": config.seed,
        "eval_protocol": config.eval.protocol,
        "git_sha": git_sha(),
        "run_name": config.run.name,
        **checksums,
        "mean_mIoU_all_over_steps": round(mean_over_steps(alls), 4) if alls else None,
        "steps": rows,
    }


def run_experiment(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    progress: bool = True,
    run_dir: Location | None = None,
    mlflow_experiment: str | None = None,
    mlflow_parent: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) every step; returns the results.json document.

    `reporter(step, row)` is called after every step (a Tune trial reports through it), after the
    last one only once results.json says "finished";
    `run_dir`, `mlflow_experiment` and `mlflow_parent` place a sweep's trial inside its sweep.
    """
    if dry_run:
        print(f"dry run: nothing is trained; the step table needs the dataset, so a split not yet in the dataset "
              f"cache ({storage.resolve(config.run.output_dir).join('datasets').uri}) is prepared there now")
    exp = resolve(config, progress=progress, run_dir=run_dir)
    print(f"run {config.run.name}: {config.method.name} on {config.dataset.name} {config.task.name} "
          f"({config.task.setting}), {exp.schedule.num_steps} step(s), eval protocol {config.eval.protocol}, "
          f"split checksum {exp.train_splits.checksum}")
    print(step_table(exp))
    if dry_run:
        print(dump_yaml(config))
        return results_document(config, [], "dry_run", exp.checksums)
    if resume:
        require_existing_run(exp)  # a mistyped name fails here, before a lock creates its folder
    if _trains_imagenet_step0(exp):
        from eir.weights import imagenet_file

        imagenet_file(config.model.backbone)  # before Ray: one clear error instead of a worker's URLError
    from eir.runlock import hold

    with hold(exp.run_dir) as lease:
        check_run_dir(exp, resume)  # again under the lock: another run may have started in between
        return _run_steps(exp, lease, reporter, mlflow_experiment, mlflow_parent)


def _trains_imagenet_step0(exp: Experiment) -> bool:
    """Whether this run will build step 0 from ImageNet weights (not finished, not in the step-0 cache)."""
    if exp.config.model.weights != "imagenet" or storage.is_complete(exp.run_dir.join("step_0")):
        return False
    entry = step0_cache_entry(exp)
    return entry is None or not storage.is_complete(entry)


def _run_steps(exp: Experiment, lease: Lease, reporter: Reporter | None, mlflow_experiment: str | None,
               mlflow_parent: str | None) -> dict[str, Any]:
    """The step loop of a run whose directory this process holds (`lease`: checked before each step)."""
    config = exp.config
    from eir.raysession import ensure_ray
    from eir.tracking import (
        Tracker,
        load_run_ids,
        run_description,
        run_params,
        run_status,
        save_run_ids,
        source_tags,
    )
    from eir.train.artifacts import log_step_artifacts

    tracker = Tracker(exp.output_root, mlflow_experiment or f"eir-{config.dataset.name}-{config.task.name}")
    ensure_ray()
    storage.write_bytes_atomic(exp.run_dir.join("config.yaml"), dump_yaml(config).encode())
    run_ids = load_run_ids(exp.run_dir)
    sha = git_sha()
    parent = tracker.start(
        config.run.name, parent=mlflow_parent, run_id=run_ids.get("parent"),
        tags={"eir.run_dir": exp.run_dir.uri, "method": config.method.name, "git_sha": sha, **source_tags(sha)},
        description=run_description(config, exp.run_dir.join("results.json").uri),
    )
    run_ids["parent"] = parent
    save_run_ids(exp.run_dir, run_ids)

    rows: list[dict[str, Any]] = []
    previous_model: str | None = None
    ok, outcome = False, "failed"
    try:
        tracker.params(parent, {**run_params(config), "train_split_checksum": exp.train_splits.checksum,
                                "test_split_checksum": exp.test_splits.checksum, "test_images": exp.test_manifest.num_rows})
        redone = False  # once a step is trained again, every later step must be too (it builds on it)
        for step in range(exp.schedule.num_steps):
            lease.check()
            step_dir = exp.run_dir.join(f"step_{step}")
            if redone and storage.is_dir(step_dir):  # finished or not: its checkpoints and pseudo-labels are stale
                if step_dir.is_local:
                    where = f"moved aside ({storage.quarantine(step_dir).uri})"
                else:  # no rename on object stores: a stale epoch checkpoint left there would be resumed
                    storage.delete_dir(step_dir)
                    where = "deleted"
                log.warning("step %d in %s was built on the step trained again: %s and redone", step, step_dir.uri, where)
            if not redone and storage.reusable(step_dir, f"finished step {step}"):
                row = storage.read_json(step_dir.join("metrics.json"))
                log.info("step %d already finished in %s: skipped", step, step_dir.uri)
            else:
                redone = True
                row = _run_step(exp, step, step_dir, previous_model, tracker, run_ids, parent)
                log_step_artifacts(exp, step, step_dir, tracker, run_ids[f"step_{step}"])
            previous_model = step_dir.join("model.pt").uri
            rows.append(row)
            tracker.metrics(parent, _numeric(row), step=step)
            tracker.iou_table(parent, step, row["per_class_IoU"])
            final = step == exp.schedule.num_steps - 1
            if not final:
                storage.write_json_atomic(exp.run_dir.join("results.json"), results_document(config, rows, "running", exp.checksums))
            print(scores_table(rows), flush=True)
            if reporter is not None and not final:
                reporter(step, row)
        document = results_document(config, rows, "finished", exp.checksums)
        storage.write_json_atomic(exp.run_dir.join("results.json"), document)
        tracker.metrics(parent, {"mean_mIoU_all_over_steps": document["mean_mIoU_all_over_steps"],
                                 **{f"final_{k}": v for k, v in _numeric(rows[-1]).items()}}, step=len(rows) - 1)
        _log_file_artifact(tracker, parent, exp.run_dir.join("results.json"))
        ok, outcome = True, "finished"
        if reporter is not None:
            # Last, once everything is recorded: a Tune scheduler ends a trial inside its report.
            reporter(len(rows) - 1, rows[-1])
        return document
    except BaseException as exc:
        if not ok:  # a finished run stays finished whatever fails after it was recorded
            outcome = _record_stop(exp, config, rows, exc)
        raise
    finally:
        # Ends the parent and any step still RUNNING (FAILED, or KILLED for an interrupt); never raises,
        # so a dead tracking server cannot hide the error that stopped the run.
        tracker.close_tree(parent, run_status(outcome))


def _record_stop(exp: Experiment, config: ExperimentConfig, rows: list[dict[str, Any]], exc: BaseException) -> str:
    """Say in results.json why a run stopped, so nobody reads a dead run's "running" as live.

    Ctrl-C is "interrupted"; a clean SystemExit is "stopped" (how a Tune scheduler such as ASHA
    ends a trial early, inside its report); anything else is "failed", with the error. The
    finished steps stay listed, and `--resume` continues from them either way. Best effort: a
    failure to write this must not hide the error that stopped the run (a killed driver writes
    nothing at all).
    """
    if isinstance(exc, KeyboardInterrupt):
        status = "interrupted"
    elif isinstance(exc, SystemExit) and not exc.code:
        status = "stopped"
    else:
        status = "failed"
    document = {**results_document(config, rows, status, exp.checksums), "error": f"{type(exc).__name__}: {exc}"[:2000]}
    try:
        storage.write_json_atomic(exp.run_dir.join("results.json"), document)
    except Exception:  # noqa: BLE001 - reporting must not mask the original error
        log.exception("could not record the %s run in %s", status, exp.run_dir.uri)
    return status


def pseudo_label_dir(exp: Experiment, step: int) -> Location:
    """Where step `step` stores its pseudo-labelled rows (complete once its marker is written)."""
    return exp.run_dir.join(f"step_{step}", "pseudo")


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    keys = ("mIoU_all", "mIoU_old", "mIoU_new", "hIoU", "mIoU_all_fg", "mIoU_old_fg")
    return {k: row[k] for k in keys if row.get(k) is not None}


def _log_file_artifact(tracker: Any, run_id: str, loc: Location) -> None:
    """Log a file that may live on an object store: MLflow logs local files, so copy it first."""
    if loc.is_local:
        tracker.artifact(run_id, loc.path)
        return
    with tempfile.TemporaryDirectory(prefix="eir-artifact-") as folder:
        path = os.path.join(folder, loc.name)
        Path(path).write_bytes(storage.read_bytes(loc))
        tracker.artifact(run_id, path)


def stream_spec(exp: Experiment, step: int, memory: Any, store_ref: Any) -> Any:
    """What the step's data workers do to each row: LUT, crop, pseudo-labels, paste, replay."""
    from eir.data.pipeline import StreamSpec
    from eir.replay.paste import PasteConfig as PasteSettings

    cfg = exp.config
    instances = cfg.memory.kind == "instances" and memory is not None and len(memory) > 0
    ratio = cfg.replay.ratio
    replay_per_row = 0.0
    if instances:
        replay_per_row = len(memory) / max(1, exp.train_splits.counts[step]) if ratio is None else ratio / (1.0 - ratio)
    paste = None
    if instances and cfg.paste.enabled:
        paste = PasteSettings(max_instances=cfg.paste.max_instances, hard=cfg.paste.hard, probability=cfg.paste.probability)
    return StreamSpec(
        lut=exp.channels.map_lut(exp.schedule.train_lut(step)),
        crop_size=cfg.train.crop_size,
        scale=(cfg.train.scale_min, cfg.train.scale_max),
        pseudo=step > 0 and cfg.pseudo.enabled,
        paste=paste,
        old_channels=tuple(range(1, 1 + sum(len(s) for s in exp.schedule.steps[:step]))),
        class_to_channel=exp.channels.lut,
        replay_per_row=replay_per_row,
        store=store_ref,
    )


def step_stream(exp: Experiment, step: int, step_dir: Location, previous_model: str | None, plan: StepPlan) -> tuple[Any, int]:
    """The step's training stream: rows (pseudo-labelled, plus replayed images) → decode/augment/paste.

    Pseudo-labels are computed once per step by batch inference and stored in `step_<t>/pseudo/`,
    reused every epoch and on resume. The instance store reaches the data workers through Ray's
    object store once per step.
    """
    import ray
    import ray.data

    from eir.data.pipeline import _read_rows, read_prepared_rows, train_stream, write_pseudo_labels
    from eir.train.memory import load_memory

    cfg = exp.config
    ids = exp.train_splits.step_ids(step)
    lut = exp.channels.map_lut(exp.schedule.train_lut(step))
    incremental = step > 0
    rows = None
    if incremental and cfg.pseudo.enabled:
        folder = pseudo_label_dir(exp, step)
        if not storage.reusable(folder, f"step {step}'s pseudo-labels"):
            log.info("step %d: pseudo-labelling %d images with the step %d model (%d actor(s))", step, len(ids), step - 1, cfg.data.pseudo_actors)
            write_pseudo_labels(exp.train_manifest, ids, folder, model_uri=previous_model, backbone=cfg.model.backbone,
                                output_stride=cfg.model.output_stride, lut=lut, threshold=cfg.pseudo.threshold,
                                actors=cfg.data.pseudo_actors, use_gpu=cfg.scaling.use_gpu)
        else:
            log.info("step %d: reusing the pseudo-labels in %s", step, folder.uri)
        rows = read_prepared_rows(folder).select_columns(["id", "image", "label", "pseudo"])
    memory = load_memory(exp.run_dir.join(f"step_{step - 1}"), cfg.memory.kind) if incremental else None
    if cfg.memory.kind == "images" and memory is not None and len(memory):
        # DKD-M: the stored images join the stream and are relabelled with this step's LUT,
        # so the old objects in them are background.
        replayed = ray.data.from_arrow(memory.table.select(["id", "image", "label"]))
        rows = (rows if rows is not None else _read_rows(exp.train_manifest, ids)).union(replayed)
    store_ref = ray.put(memory.to_bytes()) if cfg.memory.kind == "instances" and memory is not None and len(memory) else None
    spec = stream_spec(exp, step, memory, store_ref)
    extra = len(memory) if cfg.memory.kind == "images" and memory is not None else round(len(ids) * spec.replay_per_row)
    stream = train_stream(exp.train_manifest, ids, spec, batch_size=plan.per_worker_batch,
                          num_cpus=cfg.data.num_cpus_per_worker, rows=rows, epochs=plan.epochs)
    return stream, len(ids) + extra


def _run_step(
    exp: Experiment,
    step: int,
    step_dir: Location,
    previous_model: str | None,
    tracker: Any,
    run_ids: dict[str, str],
    parent: str,
) -> dict[str, Any]:
    from eir.data.pipeline import eval_stream
    from eir.tracking import save_run_ids, step_run_name
    from eir.train.memory import build_memory, load_memory, memory_file
    from eir.train.step import run_train_step

    cfg = exp.config
    key = f"step_{step}"
    child = tracker.start(step_run_name(cfg.run.name, step), parent=parent, tags={"eir.step": str(step)},
                          run_id=run_ids.get(key))
    run_ids[key] = child
    save_run_ids(exp.run_dir, run_ids)
    plan = make_plan(exp, step, previous_model)
    eval_step = exp.eval_step(step)
    tracker.params(child, {
        "step": step,
        "classes": ",".join(map(str, exp.schedule.classes_learned(step))),
        "train_images": plan.num_train_rows,
        "test_images": plan.num_eval_rows,
        "epochs": plan.epochs,
        "lr": plan.lr,
        "global_batch": plan.global_batch,
        "per_worker_batch": plan.per_worker_batch,
        "num_workers": cfg.scaling.num_workers,
    })
    log.info("step %d: %d training images, global batch %d = %d per worker × %d workers",
             step, plan.num_train_rows, plan.global_batch, plan.per_worker_batch, cfg.scaling.num_workers)

    cache_loc = step0_cache_entry(exp) if step == 0 else None
    restarts = [0]

    def train() -> tuple[np.ndarray, Any]:
        nonlocal plan
        started = time.perf_counter()
        stream, rows_per_epoch = step_stream(exp, step, step_dir, previous_model, plan)
        plan = dataclasses.replace(plan, rows_per_epoch=rows_per_epoch)
        outcome = run_train_step(
            plan,
            stream,
            eval_stream(exp.test_manifest, list(exp.test_splits.ids[eval_step]),
                        exp.channels.map_lut(exp.task.test_lut(eval_step)),
                        protocol=cfg.eval.protocol, crop_size=cfg.eval.crop_size),
            step_dir,
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            cpus_per_worker=cfg.scaling.cpus_per_worker,
            checkpoints_to_keep=cfg.train.checkpoints_to_keep,
            max_failures=cfg.train.max_failures,
        )
        log.info("step %d trained in %.1fs", step, time.perf_counter() - started)
        if outcome.restarts:
            log.warning("step %d: Ray Train restarted the workers %d time(s) from the last epoch checkpoint", step, outcome.restarts)
        restarts[0] = outcome.restarts
        return outcome.confusion, outcome.epochs

    def from_cache() -> np.ndarray:
        log.info("step 0 taken from the step-0 cache %s", cache_loc.uri)
        storage.write_bytes_atomic(step_dir.join("model.pt"), storage.read_bytes(cache_loc.join("model.pt")))
        return np.asarray(storage.read_json(cache_loc.join("confusion.json")), dtype=np.int64)

    epochs = None
    if cache_loc is None:
        (confusion, epochs), source = train(), "trained"
    elif cache.lookup(cache_loc):
        confusion, source = from_cache(), "cache"
    else:
        with cache.writer_lock(cache_loc):
            if cache.lookup(cache_loc):  # another run trained it while we waited
                confusion, source = from_cache(), "cache"
            else:
                (confusion, epochs), source = train(), "trained"
                storage.write_bytes_atomic(cache_loc.join("model.pt"), storage.read_bytes(step_dir.join("model.pt")))
                storage.write_json_atomic(cache_loc.join("confusion.json"), confusion.tolist())
                storage.write_json_atomic(cache_loc.join("key.json"), step0_cache_key(exp))
                storage.mark_complete(cache_loc)
    if cfg.memory.kind != "none" and step < exp.schedule.num_steps - 1:
        previous = load_memory(exp.run_dir.join(f"step_{step - 1}"), cfg.memory.kind) if step > 0 else None
        summary = build_memory(exp, step, step_dir, previous)
        tracker.metrics(child, {"memory_stored": summary["stored"], "memory_bytes": summary["bytes"],
                                **{f"memory_class_{c}": n for c, n in summary["histogram"].items()}}, step=step)
    old, new = exp.groups(step)
    scores = reduce_scores(confusion, old, new, background_is_class=exp.train_manifest.info.background_is_class)
    row = exp.row(step, scores, source)
    row["checkpoint_resumes"] = restarts[0]
    for epoch_row in epochs or []:
        tracker.metrics(child, {k: v for k, v in epoch_row.items() if k.startswith("loss") or k in EPOCH_METRICS}, step=int(epoch_row["epoch"]))
    tracker.metrics(child, _numeric(row), step=step)
    tracker.tags(child, {"eir.step0_source": source})
    storage.write_json_atomic(step_dir.join("confusion.json"), confusion.tolist())
    storage.write_json_atomic(step_dir.join("plan.json"), plan.to_dict())
    storage.write_json_atomic(step_dir.join("metrics.json"), row)
    vouched = ["model.pt", "confusion.json", "plan.json", "metrics.json"]
    if cfg.memory.kind != "none" and step < exp.schedule.num_steps - 1:
        vouched.append(memory_file(step_dir, cfg.memory.kind).name)
    storage.mark_complete(step_dir, files=vouched)  # what a resumed run and the next step read
    tracker.finish(child)
    return row


__all__ = ["ConfigError", "RunDirError", "run_experiment", "resolve", "step_table"]
