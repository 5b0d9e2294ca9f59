"""`launch.py evaluate`: score a finished run's model on any dataset split, in one process.

The run's own config decides the task, class order and channel space; the dataset split can be
anything with the same label space (e.g. CamVid test after training on train). The output has
the results.json schema with one step entry.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pyarrow.parquet as pq
import torch

from eir import storage
from eir.config import ExperimentConfig
from eir.data.base import DatasetError
from eir.data.pipeline import eval_batch
from eir.data.prepare import ensure_prepared, find_prepared, synthetic_root
from eir.data.registry import dataset_info
from eir.data.splits import select_ids
from eir.metrics import reduce_scores
from eir.model import load_step_model
from eir.train.evaluate import confusion_on_batches
from eir.train.planner import RunLayout, run_method
from eir.train.results import results_document, step_row
from eir.train.rundir import RunDirError, read_run_config

log = logging.getLogger(__name__)

SHOWN_DIFFERENCES = 5


def _batches(manifest, ids: set[str], lut, protocol: str, crop_size: int, batch_size: int):
    for loc in manifest.shard_locations:
        with loc.fs.open_input_file(loc.path) as handle:
            table = pq.read_table(handle, columns=["id", "image", "label"])
        keep = [i for i, row_id in enumerate(table.column("id").to_pylist()) if row_id in ids]
        table = table.take(keep)
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            yield eval_batch(
                {"image": chunk.column("image").to_pylist(), "label": chunk.column("label").to_pylist()},
                lut=lut,
                protocol=protocol,
                crop_size=crop_size,
            )


def evaluate_run(
    run_dir: str,
    *,
    dataset: str,
    root: str,
    split: str,
    step: int | None = None,
    out: str | None = None,
    protocol: str | None = None,
) -> dict[str, Any]:
    run = storage.resolve(run_dir)
    config = read_run_config(run)
    if dataset != config.dataset.name:
        raise RunDirError(
            f"run {run.uri} was trained on {config.dataset.name!r}; --dataset {dataset!r} has another label space"
        )
    finished = [
        name for name in storage.list_dir(run) if name.startswith("step_") and storage.is_complete(run.join(name))
    ]
    if not finished:
        raise RunDirError(f"run {run.uri} has no finished step to evaluate")
    steps = sorted(int(name.split("_")[1]) for name in finished)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise RunDirError(f"step {step} of {run.uri} is not finished (finished: {steps})")
    if protocol:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, protocol=protocol))

    output_root = storage.resolve(config.run.output_dir)
    manifest = ensure_prepared(
        dataset,
        root,
        split,
        output_root,
        image_scale=config.dataset.image_scale,
        ade_ignore_other=config.dataset.ade_ignore_other,
    )
    info = manifest.info
    check_label_space(run, config, info.class_names, f"{dataset}/{split} at {root}")
    layout = RunLayout.for_dataset(config, dataset, info.num_classes, info.future_label)
    eval_step = layout.eval_step(step)
    ids = select_ids(layout.task, manifest, purpose="test")[eval_step]
    model = load_step_model(
        run.join(f"step_{step}", "model.pt").uri,
        config.model.backbone,
        config.model.output_stride,
        expected_heads=layout.head_sizes(step),
    )
    old, new = layout.groups(step)
    batches = _batches(
        manifest, set(ids), layout.test_lut(step), config.eval.protocol, config.eval.crop_size, config.eval.batch_size
    )
    matrix = confusion_on_batches(
        model,
        batches,
        1 + len(old) + len(new),
        torch.device("cpu"),
        progress=True,
        total=-(-len(ids) // config.eval.batch_size),
        predict=run_method(config).predict,
    )
    scores = reduce_scores(matrix, old, new, background_is_class=info.background_is_class)
    row = step_row(
        step,
        scores,
        class_names=info.class_names,
        channels=layout.channels,
        seen_classes=layout.task.classes_seen(eval_step),
        train_images=0,
        source=f"evaluate {dataset}/{split}",
    )
    document = results_document(config, [row], "finished", {"test_split_checksum": manifest.checksum})
    document.update({"evaluated_dataset": dataset, "evaluated_split": split, "test_images": len(ids)})
    if out:
        storage.write_json_atomic(storage.resolve(out), document)
    return document


def run_class_names(config: ExperimentConfig) -> tuple[tuple[str, ...], str] | None:
    """The class names a run was trained with and where they were read; None where they cannot be had.

    First its prepared training data (found without decoding anything), else its dataset as the
    config names it: fixed for VOC, ADE20K and CamVid, class_names.txt for a folder or synthetic root.
    """
    data = config.dataset
    output_root = storage.resolve(config.run.output_dir)
    synthetic = (data.synthetic_num_images, data.synthetic_image_size, data.synthetic_seed)
    try:
        manifest = find_prepared(
            data.name,
            data.root,
            data.train_split,
            output_root,
            image_scale=data.image_scale,
            ade_ignore_other=data.ade_ignore_other,
            synthetic=synthetic,
        )
        if manifest is not None:
            return manifest.info.class_names, f"its training data {manifest.location.uri}"
        root = data.root or (str(synthetic_root(output_root, *synthetic)) if data.name == "synthetic" else "")
        return dataset_info(data.name, root).class_names, f"its dataset {data.name} at {root or '(built in)'}"
    except DatasetError as exc:
        log.warning(
            "cannot read the class names run.output_dir=%s was trained with (%s): they are not compared "
            "with the evaluated dataset's",
            config.run.output_dir,
            exc,
        )
        return None


def label_space_differences(trained: tuple[str, ...], evaluated: tuple[str, ...]) -> list[str]:
    """How two label spaces differ: the class count first, then each class id whose name differs."""
    differences = []
    if len(trained) != len(evaluated):
        differences.append(f"K={len(evaluated) - 1} classes, the run's K={len(trained) - 1}")
    for class_id in range(max(len(trained), len(evaluated))):
        ours = trained[class_id] if class_id < len(trained) else None
        theirs = evaluated[class_id] if class_id < len(evaluated) else None
        if ours != theirs:
            differences.append(f"class {class_id} is {theirs!r}, the run's {ours!r}")
    return differences


def check_label_space(run: storage.Location, config: ExperimentConfig, names: tuple[str, ...], what: str) -> None:
    """Refuse to score a model on a dataset whose class ids mean other classes than the run's."""
    trained = run_class_names(config)
    if trained is None:
        return
    differences = label_space_differences(trained[0], names)
    if differences:
        more = len(differences) - SHOWN_DIFFERENCES
        shown = "; ".join(differences[:SHOWN_DIFFERENCES]) + (f"; and {more} more" if more > 0 else "")
        raise DatasetError(
            f"{what} does not have the classes run {run.uri} was trained with (read from {trained[1]}): {shown} "
            "(expected the same class names in the same order)"
        )
