"""`pipeline`: img/s of a step's Ray Data training stream, variant by variant, and of a torch DataLoader.

CamVid 5-3, step 1 (the config's crop, batch and memory settings). The Ray variants are the
project's own stream (`train_stream` over the planner's stream spec, as the trainer receives it):
- plain: decode, train LUT, random scale/crop/flip;
- pseudo: + the pseudo-label column cropped with the image and merged into background;
- paste: + EIR's paste from the instance store (METHOD.md §3.3);
- paste_replay: + instance-replay samples mixed in (what `method.name=eir` trains on).
Pseudo-labels are the ground truth's old classes (an oracle old model): their cost in the stream is
decoding and cropping one more PNG map, whatever the old model predicted.

Both pipelines get the whole machine, as in training: Ray Data with its default limits (the
logical CPUs of the local instance), the DataLoader with one single-threaded worker per core;
the DataLoader runs the very same `SampleMaker`, so the comparison is of the two ways of running
one transform. "Per CPU" divides by the machine's cores. Each is timed after a
warm-up run (worker start-up and the once-per-step store decode excluded for both); a timed
run covers the step's own epoch count (`train.epochs_incremental`) the way the trainer
consumes them: the DataLoader epoch after epoch, Ray as one stream holding every epoch. That
count matters: each Ray Data execution starts with ~1 s at one task (RAY_NOTES.md), a cost a
step pays once, so timing fewer epochs than a step has would overstate it. `--quick` times
fewer images over the same epochs.
The stream ships EIR's paste as plans (`eir.replay.paste.plan_paste`) that the trainer carries out on its
device; that half is timed apart, on one CPU thread over the paste variant's batches, and reported beside
the ratios (on a GPU trainer it is a few small kernels per instance).
Keys: `paste_slowdown` (paste / plain time per image), `ray_vs_dataloader` (Ray img/s / DataLoader img/s),
`trainer_paste_ms_per_image_cpu`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from eir import storage
from eir.bench.common import environment, results_path, write_results
from eir.config import load_config
from eir.data.codec import decode_map, encode_raw_map
from eir.data.ingest import read_rows
from eir.data.pipeline import SampleMaker, read_prepared_rows, train_stream
from eir.data.stream_spec import StreamSpec
from eir.raysession import ensure_ray
from eir.replay.paste import ScaledInstances, apply_paste, index_by_channel
from eir.replay.store import build_store
from eir.train.planner import PreviousStep
from eir.train.resolved import Experiment, resolve
from eir.visualize import hbar_figure

REPO = Path(__file__).resolve().parents[2]
RAY_VARIANTS = ("plain", "pseudo", "paste", "paste_replay")


def _oracle_pseudo_rows(exp: Experiment, ids: list[str], folder: Path, shard_rows: int = 32) -> None:
    """The step's rows with a `pseudo` column (old classes of the ground truth, raw maps as the pseudo-label
    pass writes them), as Parquet shards."""
    old = np.asarray(exp.schedule.classes_seen(0))
    table = read_rows(exp.train_manifest, ids).select(["id", "image", "label"])
    pseudo = []
    for label_bytes in table.column("label").to_pylist():
        label = decode_map(label_bytes)
        pseudo.append(encode_raw_map(np.where(np.isin(label, old), exp.channels.lut[label], 0).astype(np.uint8)))
    table = table.append_column("pseudo", pa.array(pseudo, type=pa.binary()))
    for index, start in enumerate(range(0, table.num_rows, shard_rows)):
        pq.write_table(table.slice(start, shard_rows), folder / f"part-{index:05d}.parquet")


def _time_run(make_run, epochs: int) -> tuple[float, int, float]:
    """Wall seconds and output samples of `make_run(epochs)` after an identical warm-up run (it
    starts the worker processes: a Ray task worker pays its torch import once, ~2 s here), and
    the wait for the first batch (the start-up a run pays before any work reaches the trainer)."""
    for _ in make_run(epochs):
        pass
    run = make_run(epochs)
    started, samples, first_batch = time.perf_counter(), 0, None
    for batch in run:
        if first_batch is None:
            first_batch = time.perf_counter() - started
        samples += len(batch["image"])
    return time.perf_counter() - started, samples, first_batch or 0.0


def _ray_run(exp: Experiment, ids: list[str], spec: StreamSpec, rows: ray.data.Dataset | None, batch: int):
    """The trainer's view: one stream holding every epoch (`train_stream(epochs=…)`). Building it
    reads the step's rows once (as the DataLoader's rows are loaded once): not timed."""

    def run(epochs: int):
        stream = train_stream(exp.train_manifest, ids, spec, batch_size=batch, num_cpus=1.0, rows=rows, epochs=epochs)
        return stream.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2)

    return run


class _SampleDataset:
    """A map-style torch dataset over in-memory rows running the stream's own `SampleMaker`."""

    def __init__(self, rows: list[dict[str, Any]], spec: StreamSpec, arrays: list, by_channel: dict):
        self.rows, self.spec, self.arrays, self.by_channel = rows, spec, arrays, by_channel
        self.make = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self.make is None:  # built in the worker process
            self.make = SampleMaker(self.spec, self.arrays, self.by_channel, np.random.default_rng())
        row = self.rows[index]
        sample = self.make(row["image"], row["label"], row.get("pseudo") if self.spec.pseudo else None)[0]
        planned = {} if sample.paste_plan is None else {"paste_plan": sample.paste_plan}
        return {"image": sample.image, "label": sample.label, **planned}


def _single_thread(_: int) -> None:
    torch.set_num_threads(1)


def _dataloader(rows: list[dict[str, Any]], spec: StreamSpec, arrays: list, by_channel: dict, batch: int, workers: int):
    loader = torch.utils.data.DataLoader(
        _SampleDataset(rows, spec, arrays, by_channel),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_single_thread,
        drop_last=False,
    )
    return lambda epochs: itertools.chain.from_iterable(loader for _ in range(epochs))


def _trainer_paste_ms(batches: list[dict[str, np.ndarray]], instances: ScaledInstances) -> float:
    """Milliseconds per image the trainer spends carrying out the stream's paste plans (`apply_paste`), on this
    machine's CPU, one thread, after one untimed pass (each instance is resized once per step, as in training)."""
    torch.set_num_threads(1)
    for batch in batches:
        apply_paste(torch.from_numpy(batch["image"]), batch["paste_plan"], instances)
    started = time.perf_counter()
    for batch in batches:
        apply_paste(torch.from_numpy(batch["image"]), batch["paste_plan"], instances)
    return 1000 * (time.perf_counter() - started) / sum(len(b["image"]) for b in batches)


def run_pipeline(quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    config = load_config(REPO / "experiments" / "camvid_5-3.yaml", ["method.name=eir", *(overrides or [])])
    exp = resolve(config, progress=False)
    cpus = os.cpu_count() or 1
    batch = config.train.batch_size // config.scaling.num_workers
    ids = list(exp.train_splits.step_ids(1))
    images, epochs = (96 if quick else len(ids)), config.train.epochs_incremental
    ids = ids[:images]
    store, _ = build_store(
        read_rows(exp.train_manifest, exp.train_splits.step_ids(0)).to_pylist(),
        exp.schedule.classes_learned(0),
        rule=config.memory.instance_rule,
        min_area=config.memory.min_area,
        step=0,
        size=config.memory.size,
        previous=None,
        seed=0,
    )
    ensure_ray()
    # Step 1 replays `store` (its object-store copy, as the driver puts it); no old model: pseudo-labels are an oracle.
    design = exp.design(1, PreviousStep(memory_items=len(store)))
    eir_spec = dataclasses.replace(design.stream, store=ray.put(store.to_bytes()))
    specs = {
        "plain": dataclasses.replace(eir_spec, pseudo=False, paste=None, replay_per_row=0.0, store=None),
        "pseudo": dataclasses.replace(eir_spec, paste=None, replay_per_row=0.0, store=None),
        "paste": dataclasses.replace(eir_spec, replay_per_row=0.0),
        "paste_replay": eir_spec,
    }
    results: dict[str, dict[str, float]] = {}

    def record(name: str, seconds: float, samples: int, first_batch_s: float) -> None:
        rows = len(ids) * epochs
        results[name] = {
            "seconds": round(seconds, 3),
            "input_rows": rows,
            "samples": samples,
            "first_batch_s": round(first_batch_s, 3),
            "img_per_s": round(rows / seconds, 2),
            "img_per_s_per_cpu": round(rows / seconds / cpus, 2),
            "samples_per_s": round(samples / seconds, 2),
        }
        print(
            f"{name:24s} {rows / seconds:7.1f} img/s  ({rows / seconds / cpus:6.1f} per CPU, {samples / seconds:7.1f} "
            f"samples/s, first batch after {first_batch_s:.2f} s)"
        )

    with tempfile.TemporaryDirectory() as folder:
        _oracle_pseudo_rows(exp, ids, Path(folder))
        pseudo_rows = read_prepared_rows(storage.resolve(folder)).select_columns(["id", "image", "label", "pseudo"])
        for name in RAY_VARIANTS:
            spec = specs[name]
            record(
                f"ray_{name}", *_time_run(_ray_run(exp, ids, spec, pseudo_rows if spec.pseudo else None, batch), epochs)
            )
        in_memory = [row for path in sorted(Path(folder).glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
        planned = list(_ray_run(exp, ids, specs["paste"], pseudo_rows, batch)(1))
    arrays, by_channel = store.decoded(), index_by_channel(store.class_ids(), eir_spec.class_to_channel)
    trainer_paste_ms = _trainer_paste_ms(planned, ScaledInstances(arrays))
    print(f"trainer-side paste (apply_paste, one CPU thread): {trainer_paste_ms:.3f} ms per image")
    for name in ("plain", "paste"):
        record(
            f"dataloader_{name}",
            *_time_run(_dataloader(in_memory, specs[name], arrays, by_channel, batch, cpus), epochs),
        )

    def per_image(name: str) -> float:
        return results[name]["seconds"] / results[name]["input_rows"]

    document = {
        "benchmark": "pipeline",
        "quick": quick,
        "paste_slowdown": round(per_image("ray_paste") / per_image("ray_plain"), 4),
        "ray_vs_dataloader": round(results["ray_plain"]["img_per_s"] / results["dataloader_plain"]["img_per_s"], 4),
        # The trainer's share of the paste (blend + maps from the plans), outside the stream's timing: on a GPU
        # trainer a few small kernels per instance; here, what it would cost a CPU trainer.
        "trainer_paste_ms_per_image_cpu": round(trainer_paste_ms, 4),
        **environment(),
        "config": {
            "task": "camvid 5-3 step 1",
            "images": len(ids),
            "timed_epochs": epochs,
            "cpus": cpus,
            "batch": batch,
            "crop": config.train.crop_size,
            "image_scale": config.dataset.image_scale,
            "memory_size": len(store),
            "replay_per_row": round(eir_spec.replay_per_row, 4),
            "pseudo_labels": "oracle (ground truth old classes)",
        },
        "results": results,
    }
    path = results_path("pipeline", quick)
    write_results(path, document)
    hbar_figure(
        {n.replace("_", " "): r["img_per_s"] for n, r in results.items()},
        path.with_suffix(".png"),
        xlabel=f"input images per second ({cpus} CPUs)",
        title="training input pipeline, CamVid 5-3 step 1",
        colors=["#4c72b0" if n.startswith("ray") else "#8c8c8c" for n in results],
    )
    print(
        f"paste_slowdown = {document['paste_slowdown']}, ray_vs_dataloader = {document['ray_vs_dataloader']}  → {path}"
    )
    return document
