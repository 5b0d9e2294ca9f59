"""The field's baselines end to end: tiny synthetic runs of mib, dkd and dkd_m through Ray Train and Ray Data.

Each method's losses are tested by hand in tests/methods/; here the runner trains them: each logs its own
terms, step 0 is trained once per loss family (MiB's softmax step 0 never serves DKD, DKD's serves DKD-M),
DKD-M replays its stored images, and MiB scores with the softmax argmax. PLOP's run is in tests/methods/test_plop.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest

from eir.config import load_config
from eir.train.experiment import run_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return tmp_path_factory.mktemp("baselines")


@pytest.fixture(scope="module")
def runs(ray_session, tiny_run: tuple[str, ...], output_dir: Path) -> dict[str, dict]:
    """mib, dkd, dkd_m in that order, one output dir (one step-0 cache)."""
    documents = {}
    for method in ("mib", "dkd", "dkd_m"):
        config = load_config(
            overrides=[*tiny_run, f"method.name={method}", f"run.name={method}", f"run.output_dir={output_dir}"]
        )
        documents[method] = run_experiment(config, progress=False)
    return documents


def _step1_metrics(output_dir: Path, method: str) -> dict[str, float]:
    mlflow.set_tracking_uri(f"sqlite:///{output_dir / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["eir-synthetic-15-5"], output_format="list")
    return next(r for r in found if r.info.run_name == f"{method}/step_1").data.metrics


def test_each_baseline_finishes_and_trains_step0_once_per_loss_family(runs: dict[str, dict], output_dir: Path) -> None:
    for method, document in runs.items():
        assert document["status"] == "finished" and document["method"] == method
        assert document["steps"][1]["mIoU_new"] is not None
    sources = {method: document["steps"][0]["source"] for method, document in runs.items()}
    assert sources == {"mib": "trained", "dkd": "trained", "dkd_m": "cache"}, "softmax and DKD step 0s differ"
    assert runs["dkd_m"]["steps"][0]["mIoU_all"] == runs["dkd"]["steps"][0]["mIoU_all"]
    families = sorted(
        json.loads(key.read_text())["loss"]["family"] for key in output_dir.glob("cache/step0/*/key.json")
    )
    assert families == ["dkd", "softmax_ce"]


def test_mib_logs_its_unbiased_terms_summed_with_weight_ten(runs: dict[str, dict], output_dir: Path) -> None:
    metrics = _step1_metrics(output_dir, "mib")
    terms = {k: v for k, v in metrics.items() if k.startswith("loss_")}
    assert set(terms) == {"loss_unce", "loss_unkd"} and terms["loss_unkd"] > 0
    assert metrics["loss"] == pytest.approx(terms["loss_unce"] + 10 * terms["loss_unkd"], rel=1e-5)
    plan = json.loads((output_dir / "mib" / "step_1" / "plan.json").read_text())
    assert plan["method"] == "mib" and plan["method_options"] == {"loss.unkd_weight": 10.0}


def test_dkd_logs_its_five_terms_with_the_published_weights(runs: dict[str, dict], output_dir: Path) -> None:
    metrics = _step1_metrics(output_dir, "dkd")
    terms = {k.removeprefix("loss_"): v for k, v in metrics.items() if k.startswith("loss_")}
    weights = {"bce": 1.0, "kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "ac": 1.0}
    assert set(terms) == set(weights)
    assert metrics["loss"] == pytest.approx(sum(weights[name] * value for name, value in terms.items()), rel=1e-5)


def test_dkd_m_replays_its_stored_images(runs: dict[str, dict], output_dir: Path) -> None:
    assert (output_dir / "dkd_m" / "step_0" / "images.parquet").is_file()
    assert not (output_dir / "dkd" / "step_0" / "images.parquet").exists(), "DKD keeps no memory"
    plan = json.loads((output_dir / "dkd_m" / "step_1" / "plan.json").read_text())
    assert plan["rows_per_epoch"] > plan["num_train_rows"], "the stored images join the step's stream"
