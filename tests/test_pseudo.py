"""The pseudo-label threshold rule on hand-made logit maps, and the quality reduction on a hand-made matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eir.pseudo import merge_pseudo, pseudo_label_quality, pseudo_labels


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_threshold_rule_on_background_pixels_only() -> None:
    # 3 old channels (bg, 1, 2) on a 1x2x2 image.
    probs = torch.tensor(
        [
            [[0.9, 0.9], [0.9, 0.9]],  # background channel: never consulted
            [[0.80, 0.60], [0.75, 0.95]],  # class 1
            [[0.10, 0.65], [0.72, 0.20]],  # class 2
        ]
    )
    logits = torch.logit(probs)[None]
    label = torch.tensor([[[0, 0], [0, 3]]])  # the last pixel is a new class (channel 3): keep GT
    out = pseudo_labels(logits, label, threshold=0.7)
    # (0,0): best 0.80 class 1 >= 0.7 → 1; (0,1): best 0.65 < 0.7 → 0; (1,0): class 1 0.75 wins over 0.72 → 1;
    # (1,1): labelled 3, not background → 0.
    assert out.dtype == torch.uint8
    assert out[0].tolist() == [[1, 0], [1, 0]]


def test_exactly_at_threshold_counts() -> None:
    logits = torch.tensor([[[[0.0]], [[logit(0.7)]]]])
    assert pseudo_labels(logits, torch.zeros(1, 1, 1, dtype=torch.long))[0, 0, 0] == 1


def test_ignore_pixels_get_no_pseudo_label() -> None:
    logits = torch.tensor([[[[0.0]], [[5.0]]]])
    assert pseudo_labels(logits, torch.full((1, 1, 1), 255))[0, 0, 0] == 0


def test_merge_fills_background_only() -> None:
    label = np.array([[0, 4, 255], [0, 0, 4]], dtype=np.uint8)
    pseudo = np.array([[2, 0, 0], [0, 1, 0]], dtype=np.uint8)
    assert merge_pseudo(label, pseudo).tolist() == [[2, 4, 255], [0, 1, 4]]


def test_bad_threshold_and_shapes() -> None:
    with pytest.raises(ValueError, match="threshold"):
        pseudo_labels(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1), threshold=1.5)
    with pytest.raises(ValueError, match="shapes"):
        pseudo_labels(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1))


def test_quality_counts_recall_over_truth_and_precision_over_claims() -> None:
    # rows = complete ground truth, columns = pseudo-label (0 = none); channels 1, 2 old, 3 new.
    confusion = np.array(
        [
            [50, 5, 0, 0],  # background: 5 pixels wrongly claimed as channel 1
            [10, 30, 0, 0],  # channel 1: 30 of 40 recovered
            [20, 0, 0, 0],  # channel 2: none recovered, none claimed
            [7, 0, 0, 0],  # a new-class pixel is never an old pixel to recover
        ]
    )
    quality = pseudo_label_quality(confusion, old_channels=[1, 2])
    assert quality["recall_old"] == pytest.approx(100 * 30 / 60)
    assert quality["precision_old"] == pytest.approx(100 * 30 / 35)
    assert quality["per_channel"][1] == {
        "recall": pytest.approx(75.0),
        "precision": pytest.approx(100 * 30 / 35),
        "pixels": 40,
    }
    assert quality["per_channel"][2] == {"recall": 0.0, "precision": None, "pixels": 20}


def test_quality_with_nothing_to_recover_is_none_not_zero() -> None:
    quality = pseudo_label_quality(np.array([[9, 0], [0, 0]]), old_channels=[1])
    assert quality["recall_old"] is None and quality["precision_old"] is None
