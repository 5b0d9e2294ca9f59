"""Pseudo-labels from the frozen old model (METHOD.md §3.3 step 1).

On pixels whose step-t label is background, the old model's most confident *foreground* class
is taken when its sigmoid reaches the threshold (0.7): those are old objects that background
shift hid. The map holds old channels only (0 = none), so the caller can tell pseudo-labelled
pixels from ground truth, and it is computed once per step on the un-augmented image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def pseudo_labels(old_logits: torch.Tensor, label: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """old_logits B x C_old x H x W, label B x H x W (channel space) → uint8 B x H x W (0 = no pseudo-label)."""
    if old_logits.dim() != 4 or label.dim() != 3 or old_logits.shape[-2:] != label.shape[-2:]:
        raise ValueError(f"shapes do not match: logits {tuple(old_logits.shape)}, label {tuple(label.shape)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"pseudo.threshold is a sigmoid score in (0, 1), got {threshold}")
    if old_logits.shape[1] < 2:
        return torch.zeros(label.shape, dtype=torch.uint8, device=label.device)
    best, index = old_logits[:, 1:].max(dim=1)
    confident = (best >= math.log(threshold / (1.0 - threshold))) & (label == 0)
    return torch.where(confident, index + 1, torch.zeros_like(index)).to(torch.uint8)


def merge_pseudo(label, pseudo):
    """Training label with pseudo-labels filled into background pixels (works on numpy or torch)."""
    return (label == 0) * pseudo + (label != 0) * label


def pseudo_label_quality(confusion: np.ndarray, old_channels: Sequence[int]) -> dict[str, Any]:
    """Recall and precision (percent) of pseudo-labels per old channel, from a confusion matrix whose
    rows are the complete ground truth and columns the pseudo-label map (0 = none).

    An oracle diagnostic, not a score: the complete labels are exactly what the method may not see
    at step t. It says how much of the old classes the targets still carry, which bounds what a
    step can keep; recall that falls step after step explains forgetting that compounds with the
    number of steps. A channel with no pixel to recover (or none claimed) gets None, not 0.
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    old = [int(c) for c in old_channels]
    hits, truth, claimed = matrix.diagonal()[old], matrix[old].sum(axis=1), matrix[:, old].sum(axis=0)
    return {
        "recall_old": _percent(hits.sum(), truth.sum()),
        "precision_old": _percent(hits.sum(), claimed.sum()),
        "per_channel": {
            c: {"recall": _percent(h, t), "precision": _percent(h, p), "pixels": int(t)}
            for c, h, t, p in zip(old, hits, truth, claimed)
        },
    }


def _percent(part: int, whole: int) -> float | None:
    return None if whole == 0 else 100.0 * float(part) / float(whole)
