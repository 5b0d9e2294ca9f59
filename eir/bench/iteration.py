"""`iteration`: time per training iteration of each method at the CamVid config's crop, and peak memory.

Measured in one process per variant (a fresh process gives a clean peak RSS), same model, batch and
crop, data excluded (the data workers run beside the trainer):
- finetune / image_replay: new-model forward + backward (BCE on one-hot targets);
- eir: + soft pasted targets, a frozen old-model forward and RSKD;
- eir_per_iteration_recipe: eir + one more old-model forward, the pseudo-labels the authors'
  recipe recomputes on every crop (this project computes them once per step instead).
Keys: `eir_vs_finetune`, `eir_vs_per_iteration_recipe` (time ratios).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from pathlib import Path
from typing import Any

import torch

from eir.bench.common import environment, results_path, write_results
from eir.config import load_config
from eir.losses import bce_loss, region_mask, rskd_loss, soft_targets
from eir.model import build_model
from eir.pseudo import pseudo_labels
from eir.visualize import hbar_figure

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("finetune", "image_replay", "eir", "eir_per_iteration_recipe")


def measure_iterations(
    variant: str,
    crop: int,
    batch: int,
    threads: int,
    iterations: int,
    warmup: int,
    *,
    backbone: str = "mobilenet_v2",
    device: str = "cpu",
    amp: bool = False,
) -> dict[str, Any]:
    """Seconds per training iteration of `variant` on tensors already on `device` (no input pipeline).

    The same loop serves this benchmark (CPU, one process per variant) and `bench gpu`'s on-device
    rate (ResNet-101, crop 512, AMP), so the GPU's "stream vs on-device" ratio compares like with like.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    where = torch.device(device)
    old_heads, new = [5], 3  # CamVid 5-3, step 1
    model = build_model(backbone, [*old_heads, new], weights=None).to(where)
    model.freeze_batchnorm()
    old = (
        build_model(backbone, old_heads, weights=None).to(where).eval().requires_grad_(False)
        if variant.startswith("eir")
        else None
    )
    optimizer = torch.optim.SGD(model.param_groups(0.001, 1e-4), lr=0.001, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler(where.type, enabled=amp)
    images = torch.randn(batch, 3, crop, crop, device=where)
    label = torch.randint(0, 9, (batch, crop, crop), device=where)
    paste_class = torch.where(
        torch.rand(batch, crop, crop, device=where) < 0.2,
        torch.randint(1, 6, (batch, crop, crop), device=where),
        torch.full((batch, crop, crop), 255, device=where),
    )
    paste_weight = torch.rand(batch, crop, crop, device=where).half()
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    times = []
    model.train()
    for index in range(warmup + iterations):
        started = time.perf_counter()
        with torch.autocast(where.type, enabled=amp):
            if variant == "eir_per_iteration_recipe":
                with torch.no_grad():
                    pseudo_labels(old(images), label, 0.7)
            if variant.startswith("eir"):
                targets, valid = soft_targets(label, 9, paste_class, paste_weight)
            else:
                targets, valid = soft_targets(label, 9)
            logits = model(images)
            loss = bce_loss(logits, targets, valid)
            if old is not None:
                with torch.no_grad():
                    old_logits = old(images)
                loss = loss + 5.0 * rskd_loss(logits, old_logits, region_mask(label, [6, 7, 8], "new_gt"))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # wait for the device: the iteration is timed to its end
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return {
        "variant": variant,
        "s_per_iteration": sum(times) / len(times),
        "times": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_memory_gb": torch.cuda.max_memory_allocated(where) / 2**30 if where.type == "cuda" else None,
    }


def _measure_in_child(variant: str, crop: int, batch: int, threads: int, iterations: int, warmup: int, queue) -> None:
    queue.put(measure_iterations(variant, crop, batch, threads, iterations, warmup))


def run_iteration(quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    config = load_config(REPO / "experiments" / "camvid_5-3.yaml", overrides or [])
    crop, batch = config.train.crop_size, config.train.batch_size // config.scaling.num_workers
    threads = max(1, int(config.scaling.cpus_per_worker))
    iterations, warmup = (4, 1) if quick else (12, 2)
    context = mp.get_context("spawn")
    results = {}
    for variant in VARIANTS:
        queue = context.Queue()
        args = (variant, crop, batch, threads, iterations, warmup, queue)
        process = context.Process(target=_measure_in_child, args=args)
        process.start()
        results[variant] = queue.get()
        process.join()
        measured = results[variant]
        print(
            f"{variant:26s} {measured['s_per_iteration'] * 1000:8.1f} ms/iteration  "
            f"peak RSS {measured['peak_rss_mb']:7.0f} MB"
        )
    t = {v: r["s_per_iteration"] for v, r in results.items()}
    document = {
        "benchmark": "iteration",
        "quick": quick,
        "eir_vs_finetune": round(t["eir"] / t["finetune"], 4),
        "eir_vs_per_iteration_recipe": round(t["eir"] / t["eir_per_iteration_recipe"], 4),
        **environment(),
        "config": {
            "crop": crop,
            "per_worker_batch": batch,
            "torch_threads": threads,
            "iterations": iterations,
            "warmup": warmup,
            "backbone": "mobilenet_v2",
            "output_stride": 16,
            "task": "camvid 5-3 step 1",
        },
        "results": results,
    }
    path = results_path("iteration", quick)
    write_results(path, document)
    hbar_figure(
        {v.replace("_per_iteration_recipe", " + per-iteration pseudo-labels"): t[v] * 1000 for v in VARIANTS},
        path.with_suffix(".png"),
        xlabel="ms per iteration",
        colors=["#4c72b0", "#4c72b0", "#55a868", "#c44e52"],
        title=f"training iteration, crop {crop}, batch {batch}, {threads} threads",
    )
    print(
        f"eir_vs_finetune = {document['eir_vs_finetune']}, "
        f"eir_vs_per_iteration_recipe = {document['eir_vs_per_iteration_recipe']}  → {path}"
    )
    return document
