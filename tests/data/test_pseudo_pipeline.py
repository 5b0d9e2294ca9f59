"""The per-class rules (PLOP's median entropy, score_quantile) through the Ray Data inference pass: the histogram
pass, then the labelling pass with the thresholds written beside the pseudo-labels, on tiny synthetic images and
an old model whose logits are known by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eir import storage
from eir.data.codec import decode_map
from eir.data.ingest import read_rows
from eir.data.pipeline import (
    read_class_thresholds,
    read_manifest_rows,
    read_prepared_rows,
    threshold_histogram_pass,
    write_pseudo_labels,
)
from eir.data.prepare import ensure_prepared
from eir.labels import REJECTED_PSEUDO
from eir.model import build_model
from eir.pseudo import ENTROPY_BINS, SCORE_BINS, EntropyThresholds, PseudoRule, ScoreThresholds
from eir.tasks import get_task

pytestmark = pytest.mark.slow
OLD_CHANNELS = 11  # synthetic 10-10: the step-0 model has background and classes 1..10
BIASES = [1.0, 0.5, 0.0, 3.0] + [-1.0] * 7  # logits everywhere: channel 3 wins
ENTROPY_RULE = PseudoRule("median_entropy")
QUANTILE_RULE = PseudoRule("score_quantile", threshold=0.7, quantile=0.5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = storage.resolve(tmp_path_factory.mktemp("pseudo-pipeline"))
    manifest = ensure_prepared("synthetic", "", "train", root, synthetic=(12, 48, 0), progress=False)
    return root, manifest, get_task("synthetic", "10-10")


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A step-0 model whose heads ignore the image (zero weights): its logits are BIASES at every pixel."""
    model = build_model("mobilenet_v2", [10], weights=None)
    with torch.no_grad():
        for head in model.heads:
            head.weight.zero_()
        model.heads[0].bias.fill_(BIASES[0])
        model.heads[1].bias.copy_(torch.tensor(BIASES[1:]))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": model.state_dict(), "head_sizes": [10]}, path)
    return str(path)


def entropy_by_hand() -> float:
    exps = [math.exp(b) for b in BIASES]
    probabilities = [e / sum(exps) for e in exps]
    return -sum(p * math.log(p) for p in probabilities) / math.log(len(probabilities))


def old_model(uri: str, lut: np.ndarray, batch_size: int = 2) -> dict:
    """The keyword arguments of both passes that name the old model, its LUT and the actor pool."""
    return {
        "model_uri": uri,
        "backbone": "mobilenet_v2",
        "output_stride": 16,
        "lut": lut,
        "actors": 1,
        "use_gpu": False,
        "batch_size": batch_size,
    }


def background_pixels(manifest, ids: list[str], lut: np.ndarray) -> int:
    rows = [row for row in read_rows(manifest).to_pylist() if row["id"] in ids]
    return sum(int((lut[decode_map(row["label"])] == 0).sum()) for row in rows)


def test_histogram_pass_counts_every_background_pixel_in_the_old_models_cell(ray_session, prepared, constant_model):
    _, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:7]
    lut = task.train_lut(1)
    model = old_model(constant_model, lut, 3)
    histogram = threshold_histogram_pass(manifest, ids, rule=ENTROPY_RULE, old_channels=OLD_CHANNELS, **model)
    expected = np.zeros((OLD_CHANNELS, ENTROPY_BINS), dtype=np.int64)
    expected[3, int(entropy_by_hand() * ENTROPY_BINS)] = background_pixels(manifest, ids, lut)
    assert expected.sum() > 0 and (histogram == expected).all()
    # score_quantile: the same pixels, in the bin of channel 3's sigmoid (it is the old model's prediction).
    scores = threshold_histogram_pass(manifest, ids, rule=QUANTILE_RULE, old_channels=OLD_CHANNELS, **model)
    expected = np.zeros((OLD_CHANNELS, SCORE_BINS), dtype=np.int64)
    expected[3, int(SCORE_BINS / (1 + math.exp(-BIASES[3])))] = background_pixels(manifest, ids, lut)
    assert (scores == expected).all()


@pytest.mark.parametrize("accepted", [True, False], ids=["below tau_3: accepted", "above tau_3: rejected"])
def test_pseudo_labels_by_the_entropy_rule_carry_their_thresholds(
    ray_session, prepared, constant_model, tmp_path: Path, accepted: bool
) -> None:
    root, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:5]
    lut = task.train_lut(1)
    histogram = np.zeros((OLD_CHANNELS, ENTROPY_BINS), dtype=np.int64)
    histogram[3, 10] = 8  # τ_3 = the median 0.0105, below the model's entropy, unless the floor lifts it
    thresholds = EntropyThresholds.from_histogram(histogram, floor=0.99 if accepted else 0.0)
    out = root.join(f"pseudo-{accepted}")
    write_pseudo_labels(
        read_manifest_rows(manifest, ids),
        out,
        expected_rows=len(ids),
        rule=ENTROPY_RULE,
        thresholds=thresholds,
        **old_model(constant_model, lut),
    )
    assert storage.is_complete(out) and not storage.damaged_files(out)
    assert read_class_thresholds(out) == thresholds
    rows = read_prepared_rows(out).take_all()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for row in rows:
        label, pseudo = lut[decode_map(row["label"])], decode_map(row["pseudo"])
        assert (pseudo[label == 0] == (3 if accepted else REJECTED_PSEUDO)).all() and (pseudo[label != 0] == 0).all()


def test_score_rule_rows_carry_no_thresholds(ray_session, prepared, constant_model) -> None:
    root, manifest, task = prepared
    out = root.join("pseudo-score")
    ids = read_rows(manifest).column("id").to_pylist()[:2]
    model = old_model(constant_model, task.train_lut(1))
    write_pseudo_labels(
        read_manifest_rows(manifest, ids), out, expected_rows=len(ids), rule=PseudoRule("score", threshold=0.7), **model
    )
    assert storage.is_complete(out) and read_class_thresholds(out) is None
    with pytest.raises(ValueError, match="score_quantile"):
        write_pseudo_labels(
            read_manifest_rows(manifest, ids),
            root.join("pseudo-missing"),
            expected_rows=len(ids),
            rule=QUANTILE_RULE,
            **model,
        )


@pytest.mark.parametrize("accepted", [True, False], ids=["tau_3 below the score", "tau_3 above it"])
def test_pseudo_labels_by_per_class_score_thresholds(ray_session, prepared, constant_model, accepted: bool) -> None:
    """score_quantile with τ_3 on either side of the old model's score σ(3) = 0.953: every background pixel gets
    channel 3 or nothing (0, never a rejection mark), and the thresholds travel with the rows."""
    root, manifest, task = prepared
    ids = read_rows(manifest).column("id").to_pylist()[:4]
    lut = task.train_lut(1)
    histogram = np.zeros((OLD_CHANNELS, SCORE_BINS), dtype=np.int64)
    histogram[3, 400 if accepted else 980] = 6
    thresholds = ScoreThresholds.from_histogram(histogram, quantile=0.5, cap=0.99)
    assert thresholds.thresholds[3] == pytest.approx(0.4 if accepted else 0.98)  # the median's bin edge
    out = root.join(f"pseudo-quantile-{accepted}")
    write_pseudo_labels(
        read_manifest_rows(manifest, ids),
        out,
        expected_rows=len(ids),
        rule=QUANTILE_RULE,
        thresholds=thresholds,
        **old_model(constant_model, lut),
    )
    assert read_class_thresholds(out) == thresholds
    for row in read_prepared_rows(out).take_all():
        label, pseudo = lut[decode_map(row["label"])], decode_map(row["pseudo"])
        assert (pseudo[label == 0] == (3 if accepted else 0)).all() and (pseudo[label != 0] == 0).all()
