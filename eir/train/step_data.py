"""A step's data streams, assembled on the driver from its `StepDesign`.

Training rows are the step's images, pseudo-labelled once by step t−1's model (stored in
`step_<t>/pseudo/`, reused every epoch and on resume), plus step t−1's stored images for image
replay (never pseudo-labelled); the instance store reaches the data workers through Ray's object
store, once per step.
"""

from __future__ import annotations

import dataclasses
import logging

import ray
import ray.data

from eir import storage
from eir.data.pipeline import (
    ROW_COLUMNS,
    eval_stream,
    read_class_thresholds,
    read_manifest_rows,
    read_prepared_rows,
    threshold_histogram_pass,
    train_stream,
    with_stored_images,
    write_pseudo_labels,
)
from eir.pseudo import thresholds_from_histogram
from eir.replay.image_store import ImageStore
from eir.replay.store import InstanceStore
from eir.train.planner import StepDesign
from eir.train.resolved import Experiment, pseudo_label_dir

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
        rows = with_stored_images(own, memory.table, pseudo=design.pseudo)
    elif design.replay == "instances":
        spec = dataclasses.replace(spec, store=ray.put(memory.to_bytes()))
    return train_stream(
        exp.train_manifest,
        ids,
        spec,
        batch_size=plan.per_worker_batch,
        num_cpus=cfg.data.num_cpus_per_worker,
        rows=rows,
        epochs=plan.epochs,
    )


def pseudo_labelled_rows(exp: Experiment, design: StepDesign, ids: list[str]) -> ray.data.Dataset:
    """The step's rows with step t−1's pseudo-labels, labelled now unless an earlier attempt finished them.

    Under a per-class rule (PLOP's median entropy, score_quantile) a first pass of the old model over the step's
    images sets the thresholds; they are written with the pseudo-labels, so a resumed step reuses both.
    """
    plan, cfg, rule = design.plan, exp.config, design.pseudo_rule
    folder = pseudo_label_dir(exp, plan.step)
    if storage.reusable(folder, f"step {plan.step}'s pseudo-labels"):
        log.info("step %d: reusing the pseudo-labels in %s", plan.step, folder.uri)
        thresholds = read_class_thresholds(folder)
    else:
        model = {
            "model_uri": plan.previous_model,
            "backbone": plan.backbone,
            "output_stride": plan.output_stride,
            "lut": design.stream.lut,
            "actors": cfg.data.pseudo_actors,
            "use_gpu": cfg.scaling.use_gpu,
        }
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
            cfg.data.pseudo_actors,
        )
        write_pseudo_labels(exp.train_manifest, ids, folder, rule=rule, thresholds=thresholds, **model)
    if thresholds is not None:
        log.info(
            "step %d: pseudo-label thresholds (%s) per old channel: %s",
            plan.step,
            thresholds.rule,
            thresholds.summary(),
        )
    return read_prepared_rows(folder).select_columns([*ROW_COLUMNS, "pseudo"])


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
