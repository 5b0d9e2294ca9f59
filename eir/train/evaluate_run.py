"""`launch.py evaluate`: score a finished run's model on any dataset split, in one process.

The run's own config decides the task, class order and channel space; the dataset split can be
anything with the same label space (e.g. CamVid test after training on train). The output has
the results.json schema with one step entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow.parquet as pq
import torch

from eir import storage
from eir.data.pipeline import eval_batch
from eir.data.prepare import ensure_prepared
from eir.data.splits import select_ids
from eir.metrics import reduce_scores
from eir.train.evaluate import confusion_on_batches
from eir.train.experiment import ChannelSpace, RunDirError, read_run_config, results_document, step_row
from eir.train.artifacts import load_step_model


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
        raise RunDirError(f"run {run.uri} was trained on {config.dataset.name!r}; --dataset {dataset!r} has another label space")
    finished = [name for name in storage.list_dir(run) if name.startswith("step_") and storage.is_complete(run.join(name))]
    if not finished:
        raise RunDirError(f"run {run.uri} has no finished step to evaluate")
    steps = sorted(int(name.split("_")[1]) for name in finished)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise RunDirError(f"step {step} of {run.uri} is not finished (finished: {steps})")
    if protocol:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, protocol=protocol))

    from eir.tasks import get_task

    output_root = storage.resolve(config.run.output_dir)
    manifest = ensure_prepared(dataset, root, split, output_root, image_scale=config.dataset.image_scale)
    info = manifest.info
    task = get_task(dataset, config.task.name, config.task.setting, num_classes=info.num_classes,
                    class_order=config.task.class_order, future_label=info.future_label)
    joint = config.method.name == "joint"
    eval_step = task.num_steps - 1 if joint else step
    ids = select_ids(task, manifest, purpose="test")[eval_step]
    channels = ChannelSpace.of(task)
    schedule = task.joint() if joint else task
    model = load_step_model(run.join(f"step_{step}", "model.pt").uri, config.model.backbone, config.model.output_stride,
                            expected_heads=[len(classes) for classes in schedule.steps[: step + 1]])
    lut = channels.map_lut(task.test_lut(eval_step))
    n_old = len(task.steps[0])
    n_seen = len(task.classes_seen(eval_step))
    batches = _batches(manifest, set(ids), lut, config.eval.protocol, config.eval.crop_size, config.eval.batch_size)
    matrix = confusion_on_batches(model, batches, 1 + n_seen, torch.device("cpu"), progress=True,
                                  total=-(-len(ids) // config.eval.batch_size))
    scores = reduce_scores(matrix, range(1, n_old + 1), range(n_old + 1, n_seen + 1), background_is_class=info.background_is_class)
    row = step_row(step, scores, class_names=info.class_names, channels=channels,
                   seen_classes=task.classes_seen(eval_step), train_images=0, source=f"evaluate {dataset}/{split}")
    document = results_document(config, [row], "finished", {"test_split_checksum": manifest.checksum})
    document.update({"evaluated_dataset": dataset, "evaluated_split": split, "test_images": len(ids)})
    if out:
        storage.write_json_atomic(storage.resolve(out), document)
    return document
