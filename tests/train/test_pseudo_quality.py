"""`launch.py pseudo-labels` on a hand-made run dir: pseudo maps built from the complete labels with
a known share of the old pixels kept and a known false claim, so the expected scores are counted
here independently of the confusion matrix the command uses. No training needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eir import storage
from eir.config import dump_yaml, load_config
from eir.data.codec import decode_map, encode_png
from eir.data.ingest import read_rows
from eir.data.pipeline import THRESHOLDS_FILE
from eir.pseudo import SCORE_BINS, ScoreThresholds
from eir.train.resolved import resolve

REPO = Path(__file__).resolve().parents[2]
# A reversed class order: pseudo maps hold channels, labels hold class ids, so the ids must be mapped.
REVERSED = "task.class_order=[" + ",".join(str(c) for c in range(20, 0, -1)) + "]"
TINY = [
    "dataset.name=synthetic",
    "dataset.synthetic_num_images=40",
    "dataset.synthetic_image_size=48",
    "task.name=15-5",
    REVERSED,
]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _hand_made_run(
    output_dir: Path, method: str, *overrides: str, name: str | None = None
) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """A run dir whose step 1 pseudo-labels keep the old pixels of each label's left half, claim channel 3's
    right half as channel 1 and wrongly claim channel 1 on the background of its bottom row. Returns (run dir,
    channel labels, pseudo maps)."""
    name = name or method
    config = load_config(
        overrides=[*TINY, f"run.output_dir={output_dir}", f"run.name={name}", f"method.name={method}", *overrides]
    )
    exp = resolve(config, progress=False)
    run = output_dir / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(config))
    rows = read_rows(exp.train_manifest, exp.train_splits.step_ids(1))
    n_old = len(exp.schedule.classes_seen(0))
    labels, pseudos = [], []
    for raw in rows.column("label").to_pylist():
        channels = exp.channels.lut[decode_map(raw)]
        old = (channels >= 1) & (channels <= n_old)
        left = np.arange(channels.shape[1])[None, :] < channels.shape[1] // 2
        pseudo = np.where(old & left, channels, 0).astype(np.uint8)
        pseudo[(channels == 3) & ~left] = 1
        pseudo[-1][channels[-1] == 0] = 1
        labels.append(channels)
        pseudos.append(pseudo)
    folder = storage.resolve(str(run / "step_1" / "pseudo"))
    storage.makedirs(folder)
    table = pa.table(
        {
            "id": rows.column("id"),
            "label": rows.column("label"),
            "pseudo": pa.array([encode_png(p) for p in pseudos], type=pa.binary()),
        }
    )
    pq.write_table(table, str(run / "step_1" / "pseudo" / "part-0.parquet"))
    if config.pseudo.rule == "score_quantile":  # the thresholds a per-class rule writes beside its labels
        histogram = np.zeros((1 + n_old, SCORE_BINS), dtype=np.int64)
        histogram[1:, 300] = 4  # every old class: τ_c = min(0.7, its median's bin edge 0.3)
        thresholds = ScoreThresholds.from_histogram(histogram, quantile=0.5, cap=0.7)
        storage.write_json_atomic(folder.join(THRESHOLDS_FILE), thresholds.to_json())
    storage.mark_complete(folder)
    return run, labels, pseudos


def class_name(output_dir: Path, class_id: int) -> str:
    config = load_config(overrides=[*TINY, f"run.output_dir={output_dir}"])
    return resolve(config, progress=False).train_manifest.info.class_names[class_id]


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pseudo")


def test_scores_match_pixel_counts(output_dir: Path) -> None:
    run, labels, pseudos = _hand_made_run(output_dir, "eir")
    out, plot = output_dir / "quality.json", output_dir / "quality.png"
    result = launch("pseudo-labels", str(run), "--out", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr

    truth, pseudo = np.concatenate([x.ravel() for x in labels]), np.concatenate([x.ravel() for x in pseudos])
    old = (truth >= 1) & (truth <= 15)
    hits = old & (pseudo == truth)
    document = json.loads(out.read_text())
    (step,) = document["steps"]
    assert step["step"] == 1 and step["images"] == len(labels)
    assert step["recall_old"] == pytest.approx(100 * hits.sum() / old.sum())
    assert step["precision_old"] == pytest.approx(100 * hits.sum() / ((pseudo >= 1) & (pseudo <= 15)).sum())
    assert 0 < step["recall_old"] < 100 and step["precision_old"] < 100, "the hand-made maps miss and over-claim"
    name, first = next(iter(step["per_class"].items()))  # channel 1 (the over-claimed one) comes first
    assert name == class_name(output_dir, 6), "channel 1 is class 6: step 0 learns classes 6..20, in id order"
    assert first["pixels"] == (truth == 1).sum()
    assert first["precision"] == pytest.approx(100 * (hits & (truth == 1)).sum() / (pseudo == 1).sum())
    assert len(step["per_class"]) == 15, "every old class is listed"
    crossed = old & (pseudo != truth) & (pseudo >= 1) & (pseudo <= 15)
    assert crossed.sum() == ((truth == 3) & (pseudo == 1)).sum() > 0, "the hand-made maps cross only 3 -> 1"
    assert step["as_other_old"] == pytest.approx(100 * crossed.sum() / old.sum())
    third = step["per_class"][class_name(output_dir, 8)]  # channel 3
    assert third["as_other_old"] == pytest.approx(100 * crossed.sum() / (truth == 3).sum())
    assert third["mostly_as"] == name and first["mostly_as"] is None
    assert third["mostly_as_share"] == pytest.approx(third["as_other_old"]), "all of channel 3's crossing is to 1"
    assert f"→{name} {third['mostly_as_share']:.1f}" in result.stdout
    assert "recall old" in result.stdout and plot.is_file()


def test_a_run_without_pseudo_labels_is_a_clear_error(output_dir: Path) -> None:
    config = load_config(overrides=[*TINY, f"run.output_dir={output_dir}", "run.name=finetune", "method.name=finetune"])
    (output_dir / "finetune").mkdir()
    (output_dir / "finetune" / "config.yaml").write_text(dump_yaml(config))
    result = launch("pseudo-labels", str(output_dir / "finetune"))
    assert result.returncode != 0
    assert "no finished pseudo-labels" in result.stderr and "'finetune'" in result.stderr


def test_two_rules_side_by_side(output_dir: Path) -> None:
    """The same labels under the global score rule and under score_quantile: one JSON with both runs, each with
    its rule, the per-class rule's thresholds per old class, and one figure with a column per run."""
    score_run, _, _ = _hand_made_run(output_dir, "eir", name="eir-score")
    quantile_run, _, _ = _hand_made_run(
        output_dir, "eir", "pseudo.enabled=true", "pseudo.rule=score_quantile", "pseudo.quantile=0.5", name="eir-q"
    )
    out, plot = output_dir / "both.json", output_dir / "both.png"
    result = launch("pseudo-labels", str(score_run), str(quantile_run), "--out", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    score, quantile = json.loads(out.read_text())["runs"]
    assert (score["rule"], score["rule_settings"]) == ("score", {"threshold": 0.7})
    assert (quantile["rule"], quantile["rule_settings"]) == ("score_quantile", {"threshold": 0.7, "quantile": 0.5})
    assert "thresholds" not in score["steps"][0]
    (step,) = quantile["steps"]
    assert set(step["thresholds"]) == set(step["per_class"]) and len(step["thresholds"]) == 15
    assert all(t == pytest.approx(0.3) for t in step["thresholds"].values())
    assert step["recall_old"] == score["steps"][0]["recall_old"], "the same maps score the same"
    assert result.stdout.count("recall old") == 2 and "score_quantile (threshold 0.7, quantile 0.5)" in result.stdout
    assert plot.is_file() and plot.stat().st_size > 0
