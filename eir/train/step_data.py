"""A step's data streams, assembled on the driver from its `StepDesign`.

Training rows are the step's images, pseudo-labelled once by step t−1's model (stored in
`step_<t>/pseudo/`, reused every epoch and on resume), plus step t−1's stored images for image
replay (pseudo-labelled only when `replay.pseudo_label` asks, in `step_<t>/pseudo_replayed/`); the
instance store reaches the data workers through Ray's object store, once per step.
"""

from __future__ import annotations

import dataclasses
import logging

import pyarrow as pa
import ray
import ray.data

from eir import storage
from eir.config import ExperimentConfig
from eir.data.pipeline import (
    ROW_COLUMNS,
    StreamTasks,
    eval_stream,
    read_class_thresholds,
    read_manifest_rows,
    read_prepared_rows,
    read_prepared_table,
    threshold_histogram_pass,
    train_stream,
    with_stored_images,
    write_pseudo_labels,
)
from eir.pseudo import thresholds_from_histogram
from eir.replay.image_store import STORED_STEP, ImageStore
from eir.replay.store import InstanceStore
from eir.train.planner import StepDesign
from eir.train.resolved import Experiment, pseudo_label_dir, replayed_pseudo_label_dir

log = logging.getLogger(__name__)


def training_stream(exp: Experiment, design: StepDesign, memory: InstanceStore | ImageStore | None) -> ray.data.Dataset:
    """The step's training stream over all its epochs; `memory` is step t−1's (None when it keeps none)."""
    plan, cfg = design.plan, exp.config
    ids = exp.train_splits.step_ids(plan.step)
    rows = pseudo_labelled_rows(exp, design, ids) if design.pseudo else None
    spec = design.stream
    if design.replay == "images":
        # The stored images join the stream, each relabelled by the LUT of the step that stored it
        # (`design.stream.stored_luts`: its learned classes, or this step's under DKD-M's masking).
        own = rows if rows is not None else read_manifest_rows(exp.train_manifest, ids)
        stored = pseudo_labelled_replay(exp, design, memory.table) if design.pseudo_replayed else memory.table
        rows = with_stored_images(own, stored, pseudo=design.pseudo)
    elif design.replay == "instances":
        spec = dataclasses.replace(spec, store=ray.put(memory.to_bytes()))
    return train_stream(exp.train_manifest, ids, spec, tasks=stream_tasks(cfg), rows=rows, epochs=plan.epochs)


def stream_tasks(config: ExperimentConfig) -> StreamTasks:
    """How the configured training stream's tasks run (`data.*`)."""
    return StreamTasks(config.data.num_cpus_per_worker, config.data.stream_tasks_per_core)


def _old_model(exp: Experiment, design: StepDesign) -> dict:
    """Step t−1's model as the old-model passes load it."""
    plan = design.plan
    return {
        "model_uri": plan.previous_model,
        "backbone": plan.backbone,
        "output_stride": plan.output_stride,
        "lut": design.stream.lut,
        "actors": exp.config.data.pseudo_actors,
        "use_gpu": exp.config.scaling.use_gpu,
    }


def pseudo_labelled_rows(exp: Experiment, design: StepDesign, ids: list[str]) -> ray.data.Dataset:
    """The step's rows with step t−1's pseudo-labels, labelled now unless an earlier attempt finished them.

    Under a per-class rule (PLOP's median entropy, score_quantile) a first pass of the old model over the step's
    images sets the thresholds; they are written with the pseudo-labels, so a resumed step reuses both.
    """
    plan, rule = design.plan, design.pseudo_rule
    folder = pseudo_label_dir(exp, plan.step)
    if storage.reusable(folder, f"step {plan.step}'s pseudo-labels"):
        log.info("step %d: reusing the pseudo-labels in %s", plan.step, folder.uri)
        thresholds = read_class_thresholds(folder)
    else:
        model = _old_model(exp, design)
        thresholds = None
        if rule.per_class:
            log.info(
                "step %d: %s thresholds from the step %d model on %d images",
                plan.step,
                rule.name,
                plan.step - 1,
                len(ids),
            )
            histogram = threshold_histogram_pass(
                exp.train_manifest, ids, rule=rule, old_channels=plan.shape.old_num_channels, **model
            )
            thresholds = thresholds_from_histogram(rule, histogram)
        log.info(
            "step %d: pseudo-labelling %d images with the step %d model (%d actor(s))",
            plan.step,
            len(ids),
            plan.step - 1,
            model["actors"],
        )
        rows = read_manifest_rows(exp.train_manifest, ids)
        write_pseudo_labels(rows, folder, expected_rows=len(ids), rule=rule, thresholds=thresholds, **model)
    if thresholds is not None:
        log.info(
            "step %d: pseudo-label thresholds (%s) per old channel: %s",
            plan.step,
            thresholds.rule,
            thresholds.summary(),
        )
    return read_prepared_rows(folder).select_columns([*ROW_COLUMNS, "pseudo"])


def pseudo_labelled_replay(exp: Experiment, design: StepDesign, stored: pa.Table) -> pa.Table:
    """Image replay's stored images with step t−1's pseudo-labels (`replay.pseudo_label`), labelled once per step.

    The step's own rule and thresholds label them (a per-class rule's τ_c come from the step's own images, which
    are labelled first), each image read through the table the stream gives it (`StreamSpec.stored_luts`), so only
    the pixels its labels leave background can gain a class: under `replay.image_labels=stored` the classes learned
    after the image was stored, under `current` (DKD-M's masking) every old object the old model recognises.
    """
    plan = design.plan
    folder = replayed_pseudo_label_dir(exp, plan.step)
    if storage.reusable(folder, f"step {plan.step}'s pseudo-labels of replayed images"):
        log.info("step %d: reusing the replayed images' pseudo-labels in %s", plan.step, folder.uri)
    else:
        count, old = stored.num_rows, plan.step - 1
        log.info("step %d: pseudo-labelling %d replayed images with the step %d model", plan.step, count, old)
        write_pseudo_labels(
            ray.data.from_arrow(stored.select([*ROW_COLUMNS, STORED_STEP])),
            folder,
            expected_rows=count,
            rule=design.pseudo_rule,
            thresholds=read_class_thresholds(pseudo_label_dir(exp, plan.step)),
            stored_luts=design.stream.stored_luts,
            **_old_model(exp, design),
        )
    return read_prepared_table(folder)


def scoring_stream(exp: Experiment, design: StepDesign) -> ray.data.Dataset:
    """The test images that score the step, with the test LUT of its evaluated step."""
    cfg = exp.config
    return eval_stream(
        exp.test_manifest,
        exp.test_splits.step_ids(design.eval_step),
        design.eval_lut,
        protocol=cfg.eval.protocol,
        crop_size=cfg.eval.crop_size,
    )
