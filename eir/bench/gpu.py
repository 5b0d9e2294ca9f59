"""`gpu`: is the GPU fed? DeepLabV3-ResNet-101, crop 512, AMP, per-GPU batch 16, one Ray Train worker.

Two rates of the same EIR step-1 iteration (new model forward/backward + frozen old model + RSKD):
- **stream**: a real EIR run on synthetic 512-px data (`run_experiment`, 1 Train worker, AMP), step 1
  fed by the project's Ray Data stream with instance pasting (the workers plan each paste, the trainer
  blends on the GPU: that share is in the stream's rate, not in the on-device one); its last epoch's
  images/s and the share of that epoch spent waiting for data (`data_wait_share`), read back from MLflow
  as any run logs them.
  The run finishing with finite scores is the proof that the AMP path runs end to end.
- **on device**: the same iteration on tensors already on the GPU (`measure_iterations`), with the
  peak GPU memory it needs.
Key: `stream_vs_on_device` = stream img/s / on-device img/s (goal ≥ 0.9, data wait < 5 %).
Without a GPU the result says "not measured" and nothing runs: tests never depend on a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import torch

from eir.bench.common import environment, results_path, write_results
from eir.bench.iteration import measure_iterations
from eir.config import load_config
from eir.train.experiment import run_experiment

CROP, BATCH, BACKBONE = 512, 16, "resnet101"
NOT_MEASURED = "not measured: no GPU available"


def stream_run_overrides(num_images: int, cpus_per_worker: int) -> list[str]:
    """The EIR run whose step 1 is timed: synthetic 512-px images, 15-5 (step 1 pastes old instances)."""
    return [
        "dataset.name=synthetic",
        f"dataset.synthetic_num_images={num_images}",
        f"dataset.synthetic_image_size={CROP}",
        "task.name=15-5",
        "method.name=eir",
        "memory.size=100",
        f"model.backbone={BACKBONE}",
        "model.weights=null",  # throughput does not depend on the weights; GPU nodes may have no internet
        f"train.crop_size={CROP}",
        "train.amp=true",
        f"train.batch_size={BATCH}",
        "train.epochs=1",
        "train.epochs_incremental=2",  # the first epoch pays start-up and cuDNN autotuning: the second is timed
        f"eval.batch_size={BATCH}",
        "scaling.num_workers=1",
        "scaling.use_gpu=true",
        f"scaling.cpus_per_worker={cpus_per_worker}",
        "run.name=gpu_bench",
        "run.step0_cache=false",
    ]


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _last_epoch(tracking_uri: str, run_name: str) -> dict[str, float]:
    """images_per_s and data_wait_share of the step run's last epoch, as MLflow recorded them."""
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"attributes.run_name = '{run_name}'"
    )
    if len(runs) != 1:
        raise RuntimeError(f"expected one MLflow run named {run_name!r} in {tracking_uri}, found {len(runs)}")
    run_id = runs[0].info.run_id
    return {key: client.get_metric_history(run_id, key)[-1].value for key in ("images_per_s", "data_wait_share")}


def _stream_rate(num_images: int, cpus_per_worker: int, overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="eir-gpu-bench-") as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        config = load_config(
            overrides=[*stream_run_overrides(num_images, cpus_per_worker), f"run.output_dir={folder}", *overrides]
        )
        started = time.perf_counter()
        with _tracking_uri(uri):
            document = run_experiment(config)
        if document["status"] != "finished":
            raise RuntimeError(f"the EIR run with AMP ended {document['status']}: {document.get('error')}")
        final = document["steps"][-1]
        scores = {k: final[k] for k in ("mIoU_all", "mIoU_old", "mIoU_new")}
        return {
            **_last_epoch(uri, "gpu_bench/step_1"),
            "run_wall_s": round(time.perf_counter() - started, 1),
            "eir_amp_step": {"finished": True, "scores_finite": all(math.isfinite(v) for v in scores.values())}
            | scores,
        }


def run_gpu(quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    cores = os.cpu_count() or 1
    # The Train worker takes a quarter of the node's cores (its loader threads); Ray Data gets the rest.
    cpus_per_worker = max(1, cores // 4)
    num_images, iterations = (240, 10) if quick else (600, 30)
    config = {
        "backbone": BACKBONE,
        "crop": CROP,
        "per_gpu_batch": BATCH,
        "amp": True,
        "train_workers": 1,
        "cpus_per_worker": cpus_per_worker,
        "synthetic_images": num_images,
        "timed": "step 1 (EIR, paste on), last of 2 epochs; on device: mean of the iterations after warm-up",
        "overrides": overrides or [],
    }
    document: dict[str, Any] = {"benchmark": "gpu", "quick": quick, **environment(), "config": config}
    if not torch.cuda.is_available():
        document |= {"measured": False, "reason": NOT_MEASURED}
        print(NOT_MEASURED)
    else:
        stream = _stream_rate(num_images, cpus_per_worker, overrides or [])
        device = measure_iterations(
            "eir", CROP, BATCH, cpus_per_worker, iterations, 5, backbone=BACKBONE, device="cuda", amp=True
        )
        on_device = BATCH / device["s_per_iteration"]
        document |= {
            "measured": True,
            "stream_img_per_s": round(stream["images_per_s"], 2),
            "on_device_img_per_s": round(on_device, 2),
            "stream_vs_on_device": round(stream["images_per_s"] / on_device, 4),
            "data_wait_share": round(stream["data_wait_share"], 4),
            "peak_gpu_memory_gb": round(device["peak_device_memory_gb"], 2),
            "eir_amp_step": stream["eir_amp_step"],
            "run_wall_s": stream["run_wall_s"],
        }
        print(
            f"{document['machine']['gpu']}: stream {document['stream_img_per_s']} img/s, on device "
            f"{document['on_device_img_per_s']} img/s (ratio {document['stream_vs_on_device']}), data wait "
            f"{document['data_wait_share']:.1%}, peak {document['peak_gpu_memory_gb']} GB"
        )
    document["wall_s"] = round(time.perf_counter() - started, 1)
    path = results_path("gpu", quick)
    write_results(path, document)
    print(f"→ {path}")
    return document
