"""The pseudo-label threshold rule on hand-made logit maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eir.pseudo import merge_pseudo, pseudo_labels


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
