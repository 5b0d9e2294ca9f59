"""Sharded evaluation: each Train worker scores only its share of the test rows, and the shares add up exactly.

Driven through the data config the step's trainer uses (`EvalShardingConfig.configure`), on the shared local
Ray session, with two consumers reading their splits at the same time as two Train workers do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray.data
import torch
from ray.train import DataConfig

from eir.config import load_config
from eir.model import build_model
from eir.train.evaluate import confusion_on_batches
from eir.train.evaluate_run import evaluate_run
from eir.train.experiment import run_experiment
from eir.train.step import EvalShardingConfig

pytestmark = pytest.mark.slow

NUM_CHANNELS = 4
ROWS = 11  # odd: two workers cannot get equal shares


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "id": str(row),
            "image": rng.integers(0, 256, (32, 40, 3), dtype=np.uint8),
            "label": rng.integers(0, NUM_CHANNELS, (32, 40), dtype=np.uint8),
        }
        for row in range(ROWS)
    ]


def _score_each(splits: list, model: torch.nn.Module) -> tuple[list[np.ndarray], list[list[str]]]:
    """Every split consumed at once (a streaming split waits for all its readers), each scored on its own."""
    matrices: list[np.ndarray] = [np.zeros(0)] * len(splits)
    ids: list[list[str]] = [[] for _ in splits]

    def batches(rank: int) -> Iterator[dict]:
        for batch in splits[rank].iter_batches(batch_size=3, batch_format="numpy"):
            ids[rank].extend(batch["id"].tolist())
            yield batch

    def score(rank: int) -> None:
        matrices[rank] = confusion_on_batches(model, batches(rank), NUM_CHANNELS, torch.device("cpu"))

    threads = [threading.Thread(target=score, args=(rank,)) for rank in range(len(splits))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return matrices, ids


def test_two_workers_score_disjoint_shares_that_sum_to_the_single_worker_matrix(ray_session) -> None:
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", [NUM_CHANNELS - 1], weights=None).eval()
    dataset = ray.data.from_items(_rows())
    whole = confusion_on_batches(
        model, dataset.iter_batches(batch_size=3, batch_format="numpy"), NUM_CHANNELS, torch.device("cpu")
    )
    shards = EvalShardingConfig(datasets_to_split=["train", "test"]).configure(
        {"test": dataset}, world_size=2, worker_handles=None, worker_node_ids=None
    )
    matrices, ids = _score_each([shard["test"] for shard in shards], model)
    assert all(ids), "each worker scores a share"
    assert sorted(ids[0] + ids[1], key=int) == [str(row) for row in range(ROWS)], "every row once, on one worker"
    assert np.array_equal(matrices[0] + matrices[1], whole)
    assert whole.sum() == ROWS * 32 * 40


def test_ray_trains_default_split_would_drop_a_test_row(ray_session) -> None:
    """Why the test set has its own split: Ray's default evens the shares out by dropping rows."""
    dataset = ray.data.from_items(_rows())
    shards = DataConfig(datasets_to_split=["test"]).configure(
        {"test": dataset}, world_size=2, worker_handles=None, worker_node_ids=None
    )
    _, ids = _score_each([shard["test"] for shard in shards], build_model("mobilenet_v2", [3], weights=None).eval())
    assert len(ids[0]) + len(ids[1]) < ROWS


def test_a_two_worker_step_scores_exactly_what_one_process_scores(
    ray_session, tiny_run: tuple[str, ...], tmp_path: Path
) -> None:
    """Through the real trainer: two DDP workers each score their share; the summed scores equal a one-process
    re-scoring of the same model on the same split (`launch.py evaluate`)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    overrides = [
        *tiny_run,
        "train.epochs=1",
        "eval.batch_size=3",
        "scaling.num_workers=2",
        "run.name=two-workers",
        f"run.output_dir={tmp_path}",
    ]
    document = run_experiment(load_config(overrides=overrides), progress=False)
    raw = tmp_path / "datasets" / "synthetic-raw-n40-s48-seed0"
    for step in (0, 1):
        alone = evaluate_run(str(tmp_path / "two-workers"), dataset="synthetic", root=str(raw), split="val", step=step)
        trained = document["steps"][step]
        assert alone["steps"][0]["per_class_IoU"] == pytest.approx(trained["per_class_IoU"], abs=1e-9)
        assert alone["steps"][0]["mIoU_all"] == pytest.approx(trained["mIoU_all"], abs=1e-9)
