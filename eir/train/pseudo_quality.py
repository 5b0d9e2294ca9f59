"""`launch.py pseudo-labels`: how much of the old classes a run's stored pseudo-labels recover.

Each incremental step of a pseudo-labelling method (eir, eir_no_rskd, plop) keeps its training rows in
`step_<t>/pseudo/` with the raw dataset label beside the `pseudo` map (PLOP's rejected pixels count as
no pseudo-label), and under a per-class rule the thresholds that chose them. Several runs — one run under
two rules — are scored side by side. On overlapped CamVid, VOC and ADE the raw label is the complete annotation, so the
old-class pixels the step's targets lost to background are countable: this scores every step's
pseudo-labels against them, per old class. BENCHMARKS.md's explanation of the 6-1 erosion comes from
this command.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

from eir import storage
from eir.config import ExperimentConfig, inactive_keys
from eir.data.codec import decode_map
from eir.data.pipeline import read_class_thresholds
from eir.labels import REJECTED_PSEUDO
from eir.metrics import ConfusionMatrix
from eir.progress import progress as progress_bar
from eir.pseudo import pseudo_label_quality
from eir.train.resolved import Experiment, pseudo_label_dir, resolve
from eir.train.rundir import RunDirError, read_run_config


def score_pseudo_labels(run_dir: str, *, progress: bool = True) -> dict[str, Any]:
    """Per step with finished pseudo-labels: recall/precision of old classes, overall and per class."""
    run = storage.resolve(run_dir)
    config = read_run_config(run)
    exp = resolve(config, progress=False, run_dir=run)
    steps = [_score_step(exp, step, progress) for step in range(1, exp.schedule.num_steps) if _has_pseudo(exp, step)]
    if not steps:
        raise RunDirError(
            f"{run.uri} has no finished pseudo-labels (step_<t>/pseudo/ with its completion marker): only "
            "pseudo-labelling methods (eir, eir_no_rskd with pseudo.enabled=true) write them; "
            f"this run is {config.method.name!r}"
        )
    document = {
        "run": run.uri,
        "method": config.method.name,
        "dataset": config.dataset.name,
        "task": config.task.name,
        "task_setting": config.task.setting,
        "rule": config.pseudo.rule,
        "rule_settings": rule_settings(config),
        "steps": steps,
    }
    document["rule_label"] = rule_label(document)
    return document


RULE_SETTINGS = ("threshold", "quantile", "entropy_floor")


def rule_settings(config: ExperimentConfig) -> dict[str, float]:
    """The settings of the run's pseudo-label rule: those the config marks active for it (`inactive_keys`)."""
    inactive = inactive_keys(config)
    return {key: getattr(config.pseudo, key) for key in RULE_SETTINGS if f"pseudo.{key}" not in inactive}


def rule_label(document: dict[str, Any]) -> str:
    """`score_quantile (threshold 0.7, quantile 0.5)`: a run's rule as plots and tables name it."""
    settings = ", ".join(f"{key} {value:g}" for key, value in document["rule_settings"].items())
    return f"{document['rule']} ({settings})"


def _has_pseudo(exp: Experiment, step: int) -> bool:
    return storage.is_complete(pseudo_label_dir(exp, step))


def _score_step(exp: Experiment, step: int, progress: bool) -> dict[str, Any]:
    folder = pseudo_label_dir(exp, step)
    files = [folder.join(name) for name in sorted(storage.list_dir(folder)) if name.endswith(".parquet")]
    channels = exp.channels
    matrix = ConfusionMatrix(len(channels.class_of_channel))
    images = 0
    for loc in progress_bar(files, f"step {step} pseudo-labels", enabled=progress, unit="file"):
        with loc.fs.open_input_file(loc.path) as handle:
            table = pq.read_table(handle, columns=["label", "pseudo"])
        for label, pseudo in zip(table.column("label").to_pylist(), table.column("pseudo").to_pylist()):
            chosen = decode_map(pseudo)
            matrix.accumulate(np.where(chosen == REJECTED_PSEUDO, 0, chosen), channels.lut[decode_map(label)])
            images += 1
    old_channels = range(1, len(exp.schedule.classes_seen(step - 1)) + 1)
    quality = pseudo_label_quality(matrix.matrix, old_channels)
    names = exp.train_manifest.info.class_names
    name_of = {c: names[channels.class_of_channel[c]] for c in old_channels}
    per_class = {
        name_of[c]: {**scores, "mostly_as": None if scores["mostly_as"] is None else name_of[scores["mostly_as"]]}
        for c, scores in quality.pop("per_channel").items()
    }
    scored = {"step": step, "images": images, **quality, "per_class": per_class}
    thresholds = read_class_thresholds(folder)
    if thresholds is not None:  # a per-class rule: each old class's τ_c beside its recall
        scored["thresholds"] = {name_of[c]: thresholds.thresholds[c] for c in old_channels}
    return scored


def quality_table(document: dict[str, Any]) -> str:
    """Plain-text table: one line per step, then each old class's recall (precision) at that step and, where
    some of its pixels are pseudo-labelled as another old class, the one most of them went to and its share
    (`→road 33.2`); the step's `as other old` column is the share over all old classes and all others."""

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    def crossed(scores: dict[str, Any]) -> str:
        return "" if scores["mostly_as"] is None else f" →{scores['mostly_as']} {fmt(scores['mostly_as_share'])}"

    lines = [
        f"{'step':>4}  {'images':>6}  {'recall old':>10}  {'precision old':>13}  {'as other old':>12}  "
        "per class: recall (precision) →the other old class most of its pixels are labelled, that share"
    ]
    for step in document["steps"]:
        classes = ", ".join(
            f"{name} {fmt(s['recall'])} ({fmt(s['precision'])}){crossed(s)}" for name, s in step["per_class"].items()
        )
        lines.append(
            f"{step['step']:>4}  {step['images']:>6}  {fmt(step['recall_old']):>10}  "
            f"{fmt(step['precision_old']):>13}  {fmt(step['as_other_old']):>12}  {classes}"
        )
    return "\n".join(lines)
