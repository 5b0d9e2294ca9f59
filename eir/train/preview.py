"""`launch.py preview`: what EIR feeds the trainer at step t, drawn from an existing run.

It rebuilds step t's samples with the same `SampleMaker` the Ray Data workers use (pseudo-labels
from the step t−1 model, paste plans over the step t−1 instance store) and carries the plans out with
the trainer's own `apply_paste`, so the picture is the real training input, not an illustration.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.random import default_rng

from eir import storage
from eir.config import ConfigError
from eir.data.ingest import read_rows
from eir.data.pipeline import (
    PseudoLabeler,
    SampleMaker,
    ThresholdHistogrammer,
    dense_histogram,
    read_class_thresholds,
)
from eir.labels import NO_PASTE
from eir.pseudo import PseudoRule, thresholds_from_histogram
from eir.replay.paste import PasteConfig, ScaledInstances, apply_paste, empty_plan, index_by_channel
from eir.replay.store import InstanceStore
from eir.train.memory import memory_file
from eir.train.planner import PreviousStep
from eir.train.resolved import Experiment, pseudo_label_dir, resolve
from eir.train.rundir import RunDirError, read_run_config
from eir.visualize import colorize, image_grid

HEADERS = ["training image", "target (blended)", "pseudo-label"]


def blended_target(label: np.ndarray, paste_class: np.ndarray, paste_weight: np.ndarray) -> np.ndarray:
    """Colours of the soft target: (1 − λ)·colour(label) + λ·colour(pasted class)."""
    weight = paste_weight.astype(np.float32)[..., None]
    pasted = np.where(paste_class == NO_PASTE, 0, paste_class).astype(np.uint8)
    mixed = (1 - weight) * colorize(label) + weight * colorize(pasted)
    return mixed.round().astype(np.uint8)


def _preview_thresholds(
    exp: Experiment, step: int, rule: PseudoRule, old_channels: int, old_model: tuple, batch: dict[str, list]
) -> tuple[float, ...] | None:
    """A per-class rule's τ_c: those the step's training chose when it has run (read from its pseudo-labels),
    else read off the previewed images alone (a preview does not pass over the whole step's images)."""
    if not rule.per_class:
        return None
    folder = pseudo_label_dir(exp, step)
    found = read_class_thresholds(folder) if storage.is_complete(folder) else None
    if found is None:
        counted = ThresholdHistogrammer(*old_model, rule, use_gpu=False)(batch)
        histogram = dense_histogram([counted], rule, old_channels=old_channels, source=old_model[0])
        found = thresholds_from_histogram(rule, histogram)
    return found.thresholds


def preview_panels(exp: Experiment, step: int, count: int = 8, seed: int = 0) -> list[list[np.ndarray]]:
    """(training image, blended target, pseudo-label) of step `step`'s first `count` rows, as the trainer gets them."""
    cfg = exp.config
    if step < 1 or step >= exp.schedule.num_steps:
        raise RunDirError(f"preview needs an incremental step 1..{exp.schedule.num_steps - 1}, got {step}")
    if cfg.memory.kind != "instances":
        raise RunDirError(
            f"method {cfg.method.name!r} keeps no instance store (memory.kind={cfg.memory.kind!r}): nothing is pasted"
        )
    previous = exp.step_dir(step - 1)
    model_loc, store_loc = previous.join("model.pt"), memory_file(previous, "instances")
    for loc, what in ((model_loc, "model"), (store_loc, "instance store")):
        if not storage.exists(loc):
            raise RunDirError(
                f"preview of step {step} needs the step {step - 1} {what} {loc.uri}: "
                f"run (or resume) step {step - 1} first"
            )
    store = InstanceStore.read(store_loc)
    design = exp.design(step, PreviousStep(model_loc.uri, len(store)))
    spec = design.stream
    rows = read_rows(exp.train_manifest, exp.train_splits.step_ids(step)[:count])
    pseudo = None
    if design.pseudo:
        batch = {name: rows.column(name).to_pylist() for name in ("id", "image", "label")}
        old_model = (model_loc.uri, design.plan.backbone, design.plan.output_stride, spec.lut)
        rule, old_channels = design.pseudo_rule, design.plan.shape.old_num_channels
        thresholds = _preview_thresholds(exp, step, rule, old_channels, old_model, batch)
        labeler = PseudoLabeler(*old_model, rule, use_gpu=False, thresholds=thresholds)
        pseudo = labeler(batch)["pseudo"]
    arrays = store.decoded()
    make = SampleMaker(spec, arrays, index_by_channel(store.class_ids(), spec.class_to_channel), default_rng(seed))
    instances = ScaledInstances(arrays)  # the trainer's paste, on the CPU
    panels = []
    images, labels = rows.column("image").to_pylist(), rows.column("label").to_pylist()
    for i, (image_bytes, label_bytes) in enumerate(zip(images, labels)):
        sample = make(image_bytes, label_bytes, pseudo[i] if pseudo is not None else None)[0]
        pseudo_map = sample.pseudo if sample.pseudo is not None else np.zeros_like(sample.label)
        plan = sample.paste_plan if sample.paste_plan is not None else empty_plan(PasteConfig())
        image, paste_class, paste_weight = (
            t[0].numpy() for t in apply_paste(torch.from_numpy(sample.image[None]), plan[None], instances)
        )
        target = blended_target(sample.label, paste_class, paste_weight)
        panels.append([image.transpose(1, 2, 0), target, colorize(pseudo_map)])
    return panels


def write_preview(run_dir: str, step: int, out: str, count: int = 8) -> str:
    """Draw step `step`'s samples of a run to `out`; bad arguments fail before the run is opened."""
    if step < 1:
        raise ConfigError(
            f"bad value {step} for --step: expected an incremental step (1 or more; step 0 pastes nothing)"
        )
    if count < 1:
        raise ConfigError(f"bad value {count} for --count: expected a number of samples >= 1")
    run = storage.resolve(run_dir)
    config = read_run_config(run)
    exp = resolve(config, progress=False, run_dir=run)
    image_grid(preview_panels(exp, step, count), HEADERS, out)
    return out
