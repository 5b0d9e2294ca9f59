"""A step's MLflow artifacts, for a run dir on local disk and one on an object store (a real moto S3 server).

No training: a tiny synthetic experiment is resolved (no Ray), and a step folder is written the way
`_run_step` leaves it (an untrained model, its confusion matrix, its metrics row); then
`log_step_artifacts` logs to a real sqlite MLflow store, as the driver does after every step.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from local_services import s3_server

from eir import storage
from eir.config import load_config
from eir.metrics import reduce_scores
from eir.model import build_model
from eir.tracking import IOU_TABLE, Tracker, step_run_name
from eir.train.artifacts import log_step_artifacts
from eir.train.resolved import Experiment, resolve

BUCKET = "eir-artifacts"
PNG = b"\x89PNG\r\n\x1a\n"
STEP_FILES = {"per_class_iou.csv", "confusion.png", "predictions.png"}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module's tests (making one takes seconds), passed as MLFLOW_TRACKING_URI."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def exp(tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    torch.set_num_threads(1)
    output_dir = tmp_path_factory.mktemp("runs")
    config = load_config(
        overrides=[
            "dataset.name=synthetic",
            "dataset.synthetic_num_images=40",
            "dataset.synthetic_image_size=48",
            "task.name=15-5",
            "model.weights=null",
            f"run.output_dir={output_dir}",
            "run.name=art",
        ]
    )
    return resolve(config, progress=False)


def write_step(exp: Experiment, step: int, step_dir: storage.Location) -> dict[str, Any]:
    """What `_run_step` leaves in a finished step folder: model.pt, confusion.json, metrics.json (its row)."""
    head_sizes = exp.layout.head_sizes(step)
    model = build_model(
        exp.config.model.backbone, head_sizes, output_stride=exp.config.model.output_stride, weights=None
    )
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "head_sizes": list(head_sizes)}, buffer)
    storage.write_bytes_atomic(step_dir.join("model.pt"), buffer.getvalue())
    old, new = exp.groups(step)
    channels = 1 + len(old) + len(new)
    confusion = np.random.default_rng(step).integers(0, 50, size=(channels, channels))
    row = exp.row(step, reduce_scores(confusion, old, new), "trained")
    storage.write_json_atomic(step_dir.join("confusion.json"), confusion.tolist())
    storage.write_json_atomic(step_dir.join("metrics.json"), row)
    return row


def check_logged(tracker: Tracker, run_id: str, step: int, row: dict[str, Any], step_dir: storage.Location) -> None:
    """The run holds the IoU table (the row's classes and values) and the pictures; the step folder their copies."""
    assert {a.path for a in tracker.client.list_artifacts(run_id)} == STEP_FILES | {IOU_TABLE}
    with tempfile.TemporaryDirectory() as folder:
        table = json.loads(Path(tracker.client.download_artifacts(run_id, IOU_TABLE, folder)).read_text())
        assert table["data"] == [[step, name, iou] for name, iou in row["per_class_IoU"].items()]
        assert Path(tracker.client.download_artifacts(run_id, "confusion.png", folder)).read_bytes().startswith(PNG)
    for name in STEP_FILES - {"per_class_iou.csv"}:
        assert storage.read_bytes(step_dir.join(name)).startswith(PNG), name
    csv_lines = storage.read_bytes(step_dir.join("per_class_iou.csv")).decode().splitlines()
    assert csv_lines[0] == "class,IoU" and len(csv_lines) == 1 + len(row["per_class_IoU"])


def test_step_artifacts_for_a_local_run_dir(exp: Experiment, tracking_uri: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    tracker = Tracker(exp.output_root, "eir-artifacts-local")
    step_dir = exp.run_dir.join("step_0")
    row = write_step(exp, 0, step_dir)
    run_id = tracker.start(step_run_name("art", 0))
    log_step_artifacts(exp, 0, step_dir, tracker, run_id)
    check_logged(tracker, run_id, 0, row, step_dir)
    log_step_artifacts(exp, 0, step_dir, tracker, run_id)  # a step logged again: the table is not doubled
    check_logged(tracker, run_id, 0, row, step_dir)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


@pytest.mark.slow  # a moto server and S3 round trips
def test_step_artifacts_for_a_run_dir_on_an_object_store(
    exp: Experiment, s3_endpoint: str, tracking_uri: str, monkeypatch
) -> None:
    """The step folder in an S3 bucket (no local path, no rename); MLflow in a sqlite file (MLFLOW_TRACKING_URI)."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_TRACKING_URI": tracking_uri,
    }.items():
        monkeypatch.setenv(name, value)
    pafs.S3FileSystem(
        endpoint_override=s3_endpoint,
        access_key="test",
        secret_key="test",
        region="us-east-1",
        allow_bucket_creation=True,
    ).create_dir(BUCKET)
    root = storage.resolve(f"s3://{BUCKET}/runs")
    assert not root.is_local
    step_dir = root.join("art", "step_1")
    row = write_step(exp, 1, step_dir)
    tracker = Tracker(root, "eir-artifacts-s3")
    run_id = tracker.start(step_run_name("art", 1))
    log_step_artifacts(exp, 1, step_dir, tracker, run_id)
    check_logged(tracker, run_id, 1, row, step_dir)
