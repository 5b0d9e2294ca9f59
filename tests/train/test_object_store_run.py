"""A whole EIR run whose `run.output_dir` is an S3 bucket (a real moto S3 server on 127.0.0.1).

The bucket has no atomic rename and no local paths, so this is the cluster's shared-storage
path end to end: the dataset cache, splits, checkpoints, Ray Train storage, the instance store,
pseudo-labels, the step-0 cache and results.json all go through pyarrow's S3 filesystem, and
the Ray Train workers and Ray Data tasks (separate processes) read what the driver wrote.
The run is `launch.py run` in a subprocess with the standard AWS environment variables, as a
user on a cluster would start it. Its task, 19-1, ends with a one-class step: RSKD's background
group, the loss and every score must stay finite there (no NaN anywhere, in results.json or MLflow).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest
from local_services import aws_env, s3_server

from eir import storage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BUCKET = "eir-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


def test_eir_run_with_output_dir_on_s3(s3_endpoint: str, tmp_path: Path) -> None:
    pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        access_key="test",
        secret_key="test",
        region="us-east-1",
        allow_bucket_creation=True,
    ).create_dir(BUCKET)
    # The raw dataset lives on the driver's disk (the generator writes local files); everything
    # the run derives from it goes to the bucket.
    subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "prepare",
            "synthetic",
            "--num-images",
            "40",
            "--image-size",
            "48",
            "--out",
            str(tmp_path / "synthetic"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    output_dir = f"s3://{BUCKET}/runs"
    env = {
        **os.environ,
        **aws_env(s3_endpoint),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "EIR_RAY_NUM_CPUS": "6",
        "RAY_ADDRESS": "",
    }
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "run",
            str(REPO / "experiments" / "quickstart.yaml"),
            f"run.output_dir={output_dir}",
            "run.name=on_s3",
            f"dataset.root={tmp_path / 'synthetic' / 'raw'}",
            "task.name=19-1",
            "method.name=eir",
            "memory.size=20",
            "model.weights=null",
            "train.epochs=1",
            "train.epochs_incremental=1",
            "train.batch_size=8",
            "train.crop_size=48",
            "eval.batch_size=8",
            "scaling.cpus_per_worker=1",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"results: {output_dir}/on_s3/results.json" in result.stdout
    assert not any(work.iterdir()), f"the run wrote to the local working directory: {list(work.iterdir())}"

    os.environ.update(aws_env(s3_endpoint))  # read back through the same URI a user would give
    try:
        root = storage.resolve(output_dir)
        run = root.join("on_s3")
        document = storage.read_json(run.join("results.json"))
        assert document["status"] == "finished" and [s["source"] for s in document["steps"]] == ["trained", "trained"]
        for path in (
            "step_0/_COMPLETE",
            "step_0/model.pt",
            "step_0/instances.parquet",
            "step_1/_COMPLETE",
            "step_1/model.pt",
            "step_1/pseudo/_COMPLETE",
            "config.yaml",
        ):
            assert storage.exists(run.join(path)), f"{run.join(path).uri} missing"
        entries = storage.list_dir(root.join("cache", "step0"))
        assert len(entries) == 1 and storage.is_complete(root.join("cache", "step0", entries[0]))
        assert any(storage.is_complete(root.join("datasets", name)) for name in storage.list_dir(root.join("datasets")))
        assert _non_finite(document) == [], "a one-class step leaves no NaN/inf in results.json"
    finally:
        for key in aws_env(s3_endpoint):
            os.environ.pop(key, None)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("eir-synthetic-19-1").experiment_id])
    step1 = [r for r in runs if r.info.run_name == "on_s3/step_1"]
    assert step1 and "loss" in step1[0].data.metrics, "step 1 logged its training loss"
    for run in runs:
        for key in run.data.metrics:
            history = [m.value for m in client.get_metric_history(run.info.run_id, key)]
            assert all(math.isfinite(v) for v in history), f"{run.info.run_name}: {key} = {history}"


def _non_finite(value, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _non_finite(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in _non_finite(item, f"{where}[{i}]")]
    return [where] if isinstance(value, float) and not math.isfinite(value) else []
