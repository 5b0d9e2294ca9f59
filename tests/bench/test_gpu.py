"""`bench gpu` without a GPU: it says so and runs nothing; its parts run on the CPU at a tiny size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from eir.bench import BENCHMARKS, gpu
from eir.bench.iteration import measure_iterations
from eir.config import load_config


def test_without_a_gpu_the_result_says_not_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "results_path", lambda name, quick: tmp_path / f"{name}.json")
    monkeypatch.setattr(gpu, "_stream_rate", lambda *a: pytest.fail("no GPU: nothing may run"))
    document = BENCHMARKS["gpu"](quick=True)
    assert document["measured"] is False and document["reason"] == "not measured: no GPU available"
    assert (tmp_path / "gpu.json").is_file()
    assert document["config"]["backbone"] == "resnet101" and document["config"]["per_gpu_batch"] == 16


def test_the_timed_run_is_the_issue_s_setting() -> None:
    config = load_config(overrides=gpu.stream_run_overrides(600, 4))
    assert (config.model.backbone, config.train.crop_size, config.train.batch_size) == ("resnet101", 512, 16)
    assert config.train.amp and config.scaling.use_gpu and config.scaling.num_workers == 1
    assert config.method.name == "eir" and config.paste.enabled, "step 1 is fed with pasted instances"


def test_the_on_device_loop_runs_on_the_cpu() -> None:
    measured = measure_iterations("eir", 32, 2, 1, iterations=2, warmup=1)
    assert measured["s_per_iteration"] > 0 and len(measured["times"]) == 2
    assert measured["peak_device_memory_gb"] is None, "no device memory to report on the CPU"


@pytest.mark.slow
def test_the_stream_rate_comes_from_a_real_run(ray_session, tiny_run) -> None:
    """The GPU path's run and its MLflow read-back, on the CPU at the tiny test size."""
    cpu = [*tiny_run, "model.backbone=mobilenet_v2", "scaling.use_gpu=false", "train.amp=false"]
    stream = gpu._stream_rate(40, 1, [o for o in cpu if not o.startswith("train.epochs")])
    assert stream["images_per_s"] > 0 and 0 <= stream["data_wait_share"] <= 1
    assert stream["eir_amp_step"]["finished"] and stream["eir_amp_step"]["scores_finite"]
    assert math.isfinite(stream["eir_amp_step"]["mIoU_all"])
