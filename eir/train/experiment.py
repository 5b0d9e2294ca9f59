"""The experiment driver: steps 0..T of one task, evaluated after every step, logged to MLflow.

For each step the driver asks the planner for the step's design (`eir.train.planner`), builds its
Ray Data streams (`eir.train.step_data`), runs one Ray Train `TorchTrainer`, reduces the confusion
matrix to METHOD.md §1's scores, and writes `step_<t>/` (model.pt, metrics.json, plan.json, then
`_COMPLETE` last). A finished step is never run again: `--resume` skips it and continues the
unfinished one from its last epoch checkpoint (Ray Train restores it from `step_<t>/train/`).
Step 0 comes from the step-0 cache when an earlier run trained it under the same settings.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eir import storage
from eir.config import ExperimentConfig, dump_yaml
from eir.metrics import reduce_scores
from eir.raysession import ensure_ray
from eir.replay.image_store import ImageStore
from eir.replay.store import InstanceStore
from eir.runlock import Lease, hold
from eir.storage import Location
from eir.tracking import (
    Tracker,
    load_run_ids,
    run_description,
    run_params,
    run_status,
    save_run_ids,
    source_tags,
    step_run_name,
)
from eir.train import cache
from eir.train.artifacts import log_step_artifacts
from eir.train.memory import build_memory, load_memory, memory_file
from eir.train.planner import FaultInjection, PreviousStep, StepDesign, run_method
from eir.train.resolved import Experiment, resolve
from eir.train.results import git_sha, numeric_scores, results_document, scores_table, step_table
from eir.train.rundir import check_run_dir, require_existing_run
from eir.train.step import run_train_step
from eir.train.step_data import scoring_stream, training_stream
from eir.weights import imagenet_file

log = logging.getLogger(__name__)

Reporter = Callable[[int, dict[str, Any]], None]
Memory = InstanceStore | ImageStore
# Per-epoch values a step logs to MLflow, besides the loss and its terms ("loss_<term>").
EPOCH_METRICS = ("lr", "images_per_s", "data_wait_share", "grad_norm_max", "grad_norm_mean", "skipped_steps")


@dataclass(frozen=True)
class TrainedStep:
    """A step's model is in its folder: its test confusion matrix and how it got there."""

    confusion: np.ndarray
    source: str  # "trained", or "cache" (step 0 copied from the step-0 cache)
    epochs: tuple[dict, ...] = ()  # one entry per trained epoch: loss, lr, images_per_s, …
    restarts: int = 0  # times Ray Train restarted the workers from an epoch checkpoint


def step0_cache_key(exp: Experiment) -> dict[str, Any]:
    cfg = exp.config
    return cache.step0_key(
        cfg.flat(),
        train_split_checksum=exp.train_splits.checksum,
        test_split_checksum=exp.test_splits.checksum,
        step0_classes=list(exp.schedule.steps[0]),
        scaling={"num_workers": cfg.scaling.num_workers, "use_gpu": cfg.scaling.use_gpu},  # GPU: AMP
        loss=run_method(cfg).step0_identity(),
    )


def step0_cache_entry(exp: Experiment) -> Location | None:
    """Where this run's step 0 is cached; None when it is not cached (joint, or `run.step0_cache=false`)."""
    if exp.is_joint or not exp.config.run.step0_cache:
        return None
    return cache.entry(exp.output_root, step0_cache_key(exp))


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
        print(
            f"dry run: nothing is trained; the step table needs the dataset, so a split not yet in the dataset "
            f"cache ({storage.resolve(config.run.output_dir).join('datasets').uri}) is prepared there now"
        )
    exp = resolve(config, progress=progress, run_dir=run_dir)
    print(
        f"run {config.run.name}: {config.method.name} on {config.dataset.name} {config.task.name} "
        f"({config.task.setting}), {exp.schedule.num_steps} step(s), eval protocol {config.eval.protocol}, "
        f"split checksum {exp.train_splits.checksum}"
    )
    print(step_table(exp.facts, exp.train_manifest.info.class_names))
    if dry_run:
        print(dump_yaml(config))
        return results_document(config, [], "dry_run", exp.checksums)
    if resume:  # a mistyped name fails here, before a lock creates its folder
        require_existing_run(config.run.name, exp.output_root, exp.run_dir)
    if _trains_imagenet_step0(exp):
        imagenet_file(config.model.backbone)  # before Ray: one clear error instead of a worker's URLError
    with hold(exp.run_dir) as lease:
        # Again under the lock: another run may have started in between.
        check_run_dir(config, exp.output_root, exp.run_dir, resume)
        return _run_steps(exp, lease, reporter, mlflow_experiment, mlflow_parent)


def _trains_imagenet_step0(exp: Experiment) -> bool:
    """Whether this run will build step 0 from ImageNet weights (not finished, not in the step-0 cache)."""
    if exp.config.model.weights != "imagenet" or storage.is_complete(exp.step_dir(0)):
        return False
    entry = step0_cache_entry(exp)
    return entry is None or not storage.is_complete(entry)


def _run_steps(
    exp: Experiment, lease: Lease, reporter: Reporter | None, mlflow_experiment: str | None, mlflow_parent: str | None
) -> dict[str, Any]:
    """The step loop of a run whose directory this process holds (`lease`: checked before each step)."""
    config = exp.config
    tracker = Tracker(exp.output_root, mlflow_experiment or f"eir-{config.dataset.name}-{config.task.name}")
    ensure_ray()
    storage.write_bytes_atomic(exp.run_dir.join("config.yaml"), dump_yaml(config).encode())
    run_ids = load_run_ids(exp.run_dir)
    sha = git_sha()
    parent = tracker.start(
        config.run.name,
        parent=mlflow_parent,
        run_id=run_ids.get("parent"),
        tags={"eir.run_dir": exp.run_dir.uri, "method": config.method.name, "git_sha": sha, **source_tags(sha)},
        description=run_description(config, exp.run_dir.join("results.json").uri),
    )
    run_ids["parent"] = parent
    save_run_ids(exp.run_dir, run_ids)

    rows: list[dict[str, Any]] = []
    ok, outcome = False, "failed"
    try:
        tracker.params(parent, {**run_params(config), **exp.checksums, "test_images": exp.test_manifest.num_rows})
        redone = False  # once a step is trained again, every later step must be too (it builds on it)
        for step in range(exp.schedule.num_steps):
            lease.check()
            step_dir = exp.step_dir(step)
            if redone and storage.is_dir(step_dir):  # finished or not: its checkpoints and pseudo-labels are stale
                _discard(step, step_dir)
            if not redone and storage.reusable(step_dir, f"finished step {step}"):
                row = storage.read_json(step_dir.join("metrics.json"))
                log.info("step %d already finished in %s: skipped", step, step_dir.uri)
            else:
                redone = True
                row = _run_step(exp, step, tracker, run_ids, parent)
                log_step_artifacts(exp, step, step_dir, tracker, run_ids[f"step_{step}"])
            rows.append(row)
            tracker.metrics(parent, numeric_scores(row), step=step)
            tracker.iou_table(parent, step, row["per_class_IoU"])
            final = step == exp.schedule.num_steps - 1
            if not final:
                storage.write_json_atomic(
                    exp.run_dir.join("results.json"), results_document(config, rows, "running", exp.checksums)
                )
            print(scores_table(rows), flush=True)
            if reporter is not None and not final:
                reporter(step, row)
        document = results_document(config, rows, "finished", exp.checksums)
        storage.write_json_atomic(exp.run_dir.join("results.json"), document)
        tracker.metrics(
            parent,
            {
                "mean_mIoU_all_over_steps": document["mean_mIoU_all_over_steps"],
                **{f"final_{k}": v for k, v in numeric_scores(rows[-1]).items()},
            },
            step=len(rows) - 1,
        )
        _log_file_artifact(tracker, parent, exp.run_dir.join("results.json"))
        ok, outcome = True, "finished"
        if reporter is not None:
            # Last, once everything is recorded: a Tune scheduler ends a trial inside its report.
            reporter(len(rows) - 1, rows[-1])
        return document
    except BaseException as exc:
        if not ok:  # a finished run stays finished whatever fails after it was recorded
            outcome = _record_stop(exp, rows, exc)
        raise
    finally:
        # Ends the parent and any step still RUNNING (FAILED, or KILLED for an interrupt); never raises,
        # so a dead tracking server cannot hide the error that stopped the run.
        tracker.close_tree(parent, run_status(outcome))


def _discard(step: int, step_dir: Location) -> None:
    """Set aside a step folder built on a step that is trained again (its checkpoints would be resumed)."""
    if step_dir.is_local:
        where = f"moved aside ({storage.quarantine(step_dir).uri})"
    else:  # no rename on object stores: a stale epoch checkpoint left there would be resumed
        storage.delete_dir(step_dir)
        where = "deleted"
    log.warning("step %d in %s was built on the step trained again: %s and redone", step, step_dir.uri, where)


def _record_stop(exp: Experiment, rows: list[dict[str, Any]], exc: BaseException) -> str:
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
    error = f"{type(exc).__name__}: {exc}"[:2000]
    document = {**results_document(exp.config, rows, status, exp.checksums), "error": error}
    try:
        storage.write_json_atomic(exp.run_dir.join("results.json"), document)
    except Exception:  # reporting must not mask the original error
        log.exception("could not record the %s run in %s", status, exp.run_dir.uri)
    return status


def _run_step(exp: Experiment, step: int, tracker: Tracker, run_ids: dict[str, str], parent: str) -> dict[str, Any]:
    """Train (or take from the cache) step `step`, keep its memory, and publish its folder; returns its row."""
    key = f"step_{step}"
    child = tracker.start(
        step_run_name(exp.config.run.name, step), parent=parent, tags={"eir.step": str(step)}, run_id=run_ids.get(key)
    )
    run_ids[key] = child
    save_run_ids(exp.run_dir, run_ids)
    previous, memory = None, None
    if step > 0:
        memory = load_memory(exp.step_dir(step - 1), exp.config.memory.kind)  # read once: replayed, then pooled
        previous = PreviousStep(
            exp.step_dir(step - 1).join("model.pt").uri,
            len(memory) if memory is not None else 0,
            memory_file(exp.step_dir(step - 1), exp.config.memory.kind).uri if memory is not None else None,
        )
    design = exp.design(step, previous, FaultInjection.from_env(os.environ))
    _log_step_params(exp, design, tracker, child)
    trained = _train_or_reuse(exp, design, memory)
    kept = _keep_memory(exp, design, memory, tracker, child)
    row = _publish(exp, design, trained, kept, tracker, child)
    tracker.finish(child)
    return row


def _log_step_params(exp: Experiment, design: StepDesign, tracker: Tracker, run_id: str) -> None:
    cfg, plan = exp.config, design.plan
    tracker.params(
        run_id,
        {
            "step": plan.step,
            "classes": ",".join(map(str, exp.schedule.classes_learned(plan.step))),
            "train_images": plan.num_train_rows,
            "test_images": plan.num_eval_rows,
            "epochs": plan.epochs,
            "lr": plan.lr,
            "global_batch": plan.global_batch,
            "per_worker_batch": plan.per_worker_batch,
            "num_workers": cfg.scaling.num_workers,
        },
    )
    log.info(
        "step %d: %d training images, global batch %d = %d per worker × %d workers",
        plan.step,
        plan.num_train_rows,
        plan.global_batch,
        plan.per_worker_batch,
        cfg.scaling.num_workers,
    )


def _keep_memory(
    exp: Experiment, design: StepDesign, previous: Memory | None, tracker: Tracker, run_id: str
) -> list[str]:
    """Build and write the memory the step leaves for the next one; returns the file names it wrote."""
    spec, step = design.memory, design.plan.step
    if spec is None:
        return []
    step_dir = exp.step_dir(step)
    summary = build_memory(exp.train_manifest, exp.train_splits.step_ids(step), spec, previous, step_dir)
    tracker.metrics(
        run_id,
        {
            "memory_stored": summary["stored"],
            "memory_bytes": summary["bytes"],
            **{f"memory_class_{c}": n for c, n in summary["histogram"].items()},
        },
        step=step,
    )
    return [memory_file(step_dir, spec.kind).name]


def _publish(
    exp: Experiment, design: StepDesign, trained: TrainedStep, kept: list[str], tracker: Tracker, run_id: str
) -> dict[str, Any]:
    """Score the step, record it in MLflow and its folder, and mark the folder complete (last)."""
    plan = design.plan
    step_dir = exp.step_dir(plan.step)
    scores = reduce_scores(
        trained.confusion,
        plan.old_channels,
        plan.new_channels,
        background_is_class=exp.train_manifest.info.background_is_class,
    )
    row = {**exp.row(plan.step, scores, trained.source), "checkpoint_resumes": trained.restarts}
    for epoch_row in trained.epochs:
        tracker.metrics(
            run_id,
            {k: v for k, v in epoch_row.items() if k.startswith("loss") or k in EPOCH_METRICS},
            step=int(epoch_row["epoch"]),
        )
    tracker.metrics(run_id, numeric_scores(row), step=plan.step)
    tracker.tags(run_id, {"eir.step0_source": trained.source})
    storage.write_json_atomic(step_dir.join("confusion.json"), trained.confusion.tolist())
    storage.write_json_atomic(step_dir.join("plan.json"), plan.to_dict())
    storage.write_json_atomic(step_dir.join("metrics.json"), row)
    # What a resumed run and the next step read.
    storage.mark_complete(step_dir, files=["model.pt", "confusion.json", "plan.json", "metrics.json", *kept])
    return row


def _train_or_reuse(exp: Experiment, design: StepDesign, memory: Memory | None) -> TrainedStep:
    """Train the step; step 0 comes from (or, trained once under the cache's writer lock, goes to) the step-0 cache."""
    entry = step0_cache_entry(exp) if design.plan.step == 0 else None
    if entry is None:
        return _train(exp, design, memory)
    if cache.lookup(entry):
        return _from_cache(entry, exp.step_dir(0))
    with cache.writer_lock(entry):
        if cache.lookup(entry):  # another run trained it while we waited
            return _from_cache(entry, exp.step_dir(0))
        trained = _train(exp, design, memory)
        storage.write_bytes_atomic(entry.join("model.pt"), storage.read_bytes(exp.step_dir(0).join("model.pt")))
        storage.write_json_atomic(entry.join("confusion.json"), trained.confusion.tolist())
        storage.write_json_atomic(entry.join("key.json"), step0_cache_key(exp))
        storage.mark_complete(entry)
        return trained


def _train(exp: Experiment, design: StepDesign, memory: Memory | None) -> TrainedStep:
    cfg, step = exp.config, design.plan.step
    started = time.perf_counter()
    outcome = run_train_step(
        design.plan,
        training_stream(exp, design, memory),
        scoring_stream(exp, design),
        exp.step_dir(step),
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        cpus_per_worker=cfg.scaling.cpus_per_worker,
        worker_resource=cfg.scaling.worker_resource,
        checkpoints_to_keep=cfg.train.checkpoints_to_keep,
        max_failures=cfg.train.max_failures,
    )
    log.info("step %d trained in %.1fs", step, time.perf_counter() - started)
    if outcome.restarts:
        log.warning(
            "step %d: Ray Train restarted the workers %d time(s) from the last epoch checkpoint", step, outcome.restarts
        )
    return TrainedStep(outcome.confusion, "trained", tuple(outcome.epochs), outcome.restarts)


def _from_cache(entry: Location, step_dir: Location) -> TrainedStep:
    log.info("step 0 taken from the step-0 cache %s", entry.uri)
    storage.write_bytes_atomic(step_dir.join("model.pt"), storage.read_bytes(entry.join("model.pt")))
    return TrainedStep(np.asarray(storage.read_json(entry.join("confusion.json")), dtype=np.int64), "cache")


def _log_file_artifact(tracker: Tracker, run_id: str, loc: Location) -> None:
    """Log a file that may live on an object store: MLflow logs local files, so copy it first."""
    if loc.is_local:
        tracker.artifact(run_id, loc.path)
        return
    with tempfile.TemporaryDirectory(prefix="eir-artifact-") as folder:
        path = os.path.join(folder, loc.name)
        Path(path).write_bytes(storage.read_bytes(loc))
        tracker.artifact(run_id, path)
