"""`scaling`: Ray Train throughput of one step with 1 and 2 workers, and on a GPU when there is one.

CamVid 5-3 step 0 at the config's crop and global batch, random init (throughput does not depend
on the weights), the project's own stream and trainer (`train_stream` + `run_train_step`).
CPU variants hold the machine's cores constant: one worker with 2 torch threads against two DDP
workers (gloo) with one thread each, plus one worker with one thread as the unit. Reported per
variant: img/s and the share of the epoch spent waiting for data, from the last epoch (the first
pays process start-up). Key: `two_workers_vs_one` = img/s (2 workers × 1 thread) / img/s (1 × 2).
With a GPU (torch.cuda available) it adds DeepLabV3-ResNet101 at crop 512 with AMP; without one
the result says so.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from eir import storage
from eir.bench.common import environment, results_path, write_results
from eir.config import load_config
from eir.data.pipeline import eval_stream, train_stream
from eir.raysession import ensure_ray
from eir.train.resolved import resolve
from eir.train.step import run_train_step
from eir.train.step_data import stream_tasks
from eir.visualize import hbar_figure

REPO = Path(__file__).resolve().parents[2]
CPU_VARIANTS = (("1 worker × 1 thread", 1, 1), ("1 worker × 2 threads", 1, 2), ("2 workers × 1 thread", 2, 1))


def _throughput(
    config_overrides: list[str], images: int, epochs: int, num_workers: int, threads: int, use_gpu: bool
) -> dict[str, float]:
    config = load_config(
        REPO / "experiments" / "camvid_5-3.yaml",
        [
            "method.name=finetune",
            "model.weights=null",
            f"scaling.num_workers={num_workers}",
            f"scaling.cpus_per_worker={threads}",
            f"scaling.use_gpu={str(use_gpu).lower()}",
            *config_overrides,
        ],
    )
    exp = resolve(config, progress=False)
    ids = list(exp.train_splits.step_ids(0))[:images]
    design = exp.design(0)
    plan = dataclasses.replace(
        design.plan, epochs=epochs, num_train_rows=len(ids), rows_per_epoch=len(ids), num_eval_rows=8, weights=None
    )
    test_ids = list(exp.test_splits.ids[0])[:8]
    with tempfile.TemporaryDirectory() as folder:
        outcome = run_train_step(
            plan,
            train_stream(
                exp.train_manifest,
                ids,
                design.stream,
                tasks=stream_tasks(config),
                epochs=epochs,
            ),
            eval_stream(
                exp.test_manifest,
                test_ids,
                design.eval_lut,
                protocol=config.eval.protocol,
                crop_size=config.eval.crop_size,
            ),
            storage.resolve(folder).join("step_0"),
            num_workers=num_workers,
            use_gpu=use_gpu,
            cpus_per_worker=threads,
            worker_resource=None,
            checkpoints_to_keep=1,
            max_failures=0,
        )
    last = outcome.epochs[-1]
    return {
        "img_per_s": round(float(last["images_per_s"]), 2),
        "data_wait_share": round(float(last["data_wait_share"]), 4),
        "epoch_s": round(float(last["epoch_s"]), 2),
        "per_worker_batch": plan.per_worker_batch,
        "global_batch": plan.global_batch,
        "crop": config.train.crop_size,
    }


def run_scaling(quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    ensure_ray()
    images, epochs = (32, 2) if quick else (192, 2)
    variants = CPU_VARIANTS[1:] if quick else CPU_VARIANTS  # quick: only the two the key compares
    results: dict[str, dict[str, Any]] = {}
    for name, workers, threads in variants:
        results[name] = {
            "workers": workers,
            "threads": threads,
            **_throughput(overrides or [], images, epochs, workers, threads, use_gpu=False),
        }
        print(f"{name:24s} {results[name]['img_per_s']:6.2f} img/s  data wait {results[name]['data_wait_share']:.1%}")
    gpu: dict[str, Any] = {"available": torch.cuda.is_available()}
    if gpu["available"]:
        gpu["device"] = torch.cuda.get_device_name(0)
        gpu["resnet101_crop512_amp"] = _throughput(
            [
                "model.backbone=resnet101",
                "train.crop_size=512",
                "train.amp=true",
                "train.batch_size=16",
                *(overrides or []),
            ],
            images,
            epochs,
            1,
            8,
            use_gpu=True,
        )
        print(f"GPU {gpu['device']}: {gpu['resnet101_crop512_amp']}")
    else:
        gpu["note"] = "no GPU on this machine: the GPU figures (DeepLabV3-R101, crop 512, AMP) were not measured"
        print(gpu["note"])
    document = {
        "benchmark": "scaling",
        "quick": quick,
        "two_workers_vs_one": round(
            results["2 workers × 1 thread"]["img_per_s"] / results["1 worker × 2 threads"]["img_per_s"], 4
        ),
        **environment(),
        "config": {
            "task": "camvid 5-3 step 0",
            "images_per_epoch": images,
            "epochs": epochs,
            "timed": "last epoch",
            "overrides": overrides or [],
        },
        "results": results,
        "gpu": gpu,
    }
    path = results_path("scaling", quick)
    write_results(path, document)
    hbar_figure(
        {n: r["img_per_s"] for n, r in results.items()},
        path.with_suffix(".png"),
        xlabel="training images per second (CPU)",
        title="Ray Train throughput, CamVid 5-3 step 0",
    )
    print(f"two_workers_vs_one = {document['two_workers_vs_one']}  → {path}")
    return document
