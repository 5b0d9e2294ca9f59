"""The pictures and tables each step leaves in MLflow: per-class IoU, confusion matrix, predictions."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eir import storage
from eir.data.ingest import read_rows
from eir.data.transforms import decode_map, decode_rgb, normalize
from eir.model import load_step_model
from eir.storage import Location
from eir.tracking import Tracker
from eir.train.memory import load_memory, memory_file
from eir.train.planner import run_method
from eir.train.preview import HEADERS, preview_panels
from eir.train.resolved import Experiment
from eir.visualize import bar_chart, colorize, confusion_figure, image_grid

PREVIEW_IMAGES = 6


def prediction_panels(
    exp: Experiment,
    step: int,
    model: torch.nn.Module,
    predict: Callable[[torch.Tensor], torch.Tensor],
    count: int = PREVIEW_IMAGES,
) -> list[list[np.ndarray]]:
    """(image, ground truth, prediction) for the first test images of the step, in channel space.

    `predict` is the run's method's rule (logits → class map), the one its scores use.
    """
    ids = exp.test_splits.step_ids(exp.eval_step(step))[:count]
    if not ids:
        return []
    table = read_rows(exp.test_manifest, ids)
    lut = exp.layout.test_lut(step)
    panels = []
    with torch.no_grad():
        for image_bytes, label_bytes in zip(table.column("image").to_pylist(), table.column("label").to_pylist()):
            image, label = decode_rgb(image_bytes), lut[decode_map(label_bytes)]
            logits = model(normalize(torch.from_numpy(image.copy()).permute(2, 0, 1)[None]))
            pred = predict(logits.float())[0].numpy().astype(np.uint8)
            panels.append([image, colorize(label), colorize(pred)])
    return panels


def log_step_artifacts(exp: Experiment, step: int, step_dir: Location, tracker: Tracker, run_id: str) -> None:
    """Log step `step`'s tables and pictures to its MLflow run `run_id`, and keep a copy of each in `step_dir`.

    The per-class IoU goes in as an MLflow table (`per_class_iou.json`: step, class, IoU), which the UI
    compares across runs, and as `per_class_iou.csv`; then the confusion matrix, predictions on the first
    test images and, with instance replay, pasted samples and the memory's class histogram. Files are made
    in a local temporary folder and copied to `step_dir` through `storage`, so an object-store run dir works
    as a local one does.
    """
    cfg = exp.config
    names = exp.train_manifest.info.class_names
    channel_names = [names[c] for c in exp.channels.class_of_channel]
    row = storage.read_json(step_dir.join("metrics.json"))
    confusion = np.asarray(storage.read_json(step_dir.join("confusion.json")))
    tracker.iou_table(run_id, step, row["per_class_IoU"])
    with tempfile.TemporaryDirectory(prefix="eir-artifacts-") as folder:
        table = os.path.join(folder, "per_class_iou.csv")
        with open(table, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "IoU"])
            for name, iou in row["per_class_IoU"].items():
                writer.writerow([name, "" if iou is None else iou])
        figure = os.path.join(folder, "confusion.png")
        title = f"step {step}: confusion (row-normalised)"
        confusion_figure(confusion, channel_names[: confusion.shape[0]], figure, title)
        model = load_step_model(step_dir.join("model.pt").uri, cfg.model.backbone, cfg.model.output_stride)
        panels = prediction_panels(exp, step, model, run_method(cfg).predict)
        paths = [table, figure]
        if panels:
            grid = os.path.join(folder, "predictions.png")
            image_grid(panels, ["image", "ground truth", "prediction"], grid)
            paths.append(grid)
        if cfg.memory.kind == "instances" and step > 0 and cfg.paste.enabled:
            pasted = os.path.join(folder, "pasted_samples.png")
            image_grid(preview_panels(exp, step, count=6), HEADERS, pasted)
            paths.append(pasted)
        if cfg.memory.kind != "none" and storage.exists(memory_file(step_dir, cfg.memory.kind)):
            histogram = load_memory(step_dir, cfg.memory.kind).class_histogram()
            bars = os.path.join(folder, "memory_histogram.png")
            title = f"step {step}: stored {cfg.memory.kind} per class"
            bar_chart({names[c]: n for c, n in sorted(histogram.items())}, bars, title)
            paths.append(bars)
        for path in paths:
            tracker.artifact(run_id, path)
            storage.write_bytes_atomic(step_dir.join(os.path.basename(path)), Path(path).read_bytes())
