"""Pseudo-labels from the frozen old model (METHOD.md §3.3 step 1, §4.1 PLOP).

Two rules (`pseudo.rule`), both on the pixels whose step-t label is background (0), both computed
once per step on the un-augmented image:

- `score` (EIR): the old model's most confident *foreground* class is taken when its sigmoid
  reaches the threshold (0.7): those are old objects that background shift hid. The map holds old
  channels only (0 = none), so the caller can tell pseudo-labelled pixels from ground truth.
- `median_entropy` (PLOP): the old model's argmax channel c (background included) is taken when
  the normalised entropy of its softmax is below τ_c, else the pixel is marked `REJECTED_PSEUDO`.
  τ_c is the median normalised entropy of the step's background pixels the old model gives c,
  read off a histogram that one pass over the step's images fills (`entropy_histogram`), and no
  lower than a floor (`EntropyThresholds`). Every background pixel gets a decision, so 0 in this
  map means "accepted as background", not "none".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eir.labels import REJECTED_PSEUDO

PSEUDO_RULES = ("score", "median_entropy")
# Bins of the normalised-entropy histogram over [0, 1]. PLOP's code bins its (differently scaled) entropy
# into 100 bins over [0, 1] of which its values reach only the first 100 / (C_old · ln C), 3 at VOC 15-1's
# first step (METHOD.md §4.1); 1000 bins of the [0, 1] entropy put τ_c within 0.001 of the exact median.
ENTROPY_BINS = 1000


def _check_shapes(old_logits: torch.Tensor, label: torch.Tensor) -> None:
    if old_logits.dim() != 4 or label.dim() != 3 or old_logits.shape[-2:] != label.shape[-2:]:
        raise ValueError(f"shapes do not match: logits {tuple(old_logits.shape)}, label {tuple(label.shape)}")


def pseudo_labels(old_logits: torch.Tensor, label: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """old_logits B x C_old x H x W, label B x H x W (channel space) → uint8 B x H x W (0 = no pseudo-label)."""
    _check_shapes(old_logits, label)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"pseudo.threshold is a sigmoid score in (0, 1), got {threshold}")
    if old_logits.shape[1] < 2:
        return torch.zeros(label.shape, dtype=torch.uint8, device=label.device)
    best, index = old_logits[:, 1:].max(dim=1)
    confident = (best >= math.log(threshold / (1.0 - threshold))) & (label == 0)
    return torch.where(confident, index + 1, torch.zeros_like(index)).to(torch.uint8)


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the C channels divided by ln C, per pixel: B x H x W in [0, 1].

    PLOP's code divides further by C and by ln of the current step's channel count; that constant
    factor changes no median and no comparison, only the unit of its floor (`plop_entropy_floor`).
    """
    channels = logits.shape[1]
    if logits.dim() != 4 or channels < 2:
        raise ValueError(f"entropy needs B x C x H x W logits with C >= 2 channels, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.float(), dim=1)
    return (-(log_p.exp() * log_p).sum(1) / math.log(channels)).clamp(0.0, 1.0)


def entropy_histogram(old_logits: torch.Tensor, label: torch.Tensor, bins: int = ENTROPY_BINS) -> np.ndarray:
    """The background pixels (label 0) counted by the old model's argmax channel (row; 0 included) and
    normalised-entropy bin (column, `bins` equal bins over [0, 1]): int64 C_old x bins.

    Histograms of several batches add up, so a pass over the step's images needs no per-pixel storage.
    """
    _check_shapes(old_logits, label)
    channels = old_logits.shape[1]
    background = label == 0
    winner = old_logits.argmax(1)[background]
    column = (normalised_entropy(old_logits)[background] * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(winner * bins + column, minlength=channels * bins)
    return counts.view(channels, bins).cpu().numpy().astype(np.int64)


def histogram_medians(histogram: np.ndarray) -> np.ndarray:
    """Each row's median over [0, 1], interpolated linearly inside the bin that holds it; NaN for an empty row.

    The interpolation PLOP's code means (math.stackexchange 2591946, which it cites); its loop adds the
    bin's index instead of the bin's count to the running sum, which is not repeated here.
    """
    counts = np.asarray(histogram, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] < 1 or (counts < 0).any():
        raise ValueError(f"a histogram is C x bins of counts >= 0, got shape {counts.shape}")
    bins = counts.shape[1]
    medians = np.full(counts.shape[0], np.nan)
    for row, row_counts in enumerate(counts):
        total = int(row_counts.sum())
        if total == 0:
            continue
        cumulative = np.cumsum(row_counts)
        half = total / 2
        k = int(np.searchsorted(cumulative, half, side="left"))
        below = cumulative[k] - row_counts[k]
        medians[row] = (k + (half - below) / row_counts[k]) / bins
    return medians


def plop_entropy_floor(floor: float, old_channels: int, num_channels: int) -> float:
    """PLOP's least τ_c (`pseudo.entropy_floor`, 0.001 in its scripts) in normalised entropy.

    PLOP's code compares H / (C_old · ln C_old · ln C) with its floor (C_old: the old model's channels,
    C: the current step's, background included in both), so in H / ln C_old the floor is
    floor · C_old · ln C: 0.013 on CamVid 5-3's step 1, 0.045 on VOC 15-1's first step, 0.51 on ADE 100-50.
    """
    if not 2 <= old_channels < num_channels:
        raise ValueError(f"expected 2 <= old channels < channels, got {old_channels} and {num_channels}")
    return floor * old_channels * math.log(num_channels)


@dataclass(frozen=True)
class PseudoRule:
    """A step's pseudo-label rule (`pseudo.rule`) with its settings resolved for the step's channels."""

    name: str  # one of PSEUDO_RULES
    threshold: float = 0.7  # score: the sigmoid score a pseudo-label needs
    entropy_floor: float = 0.0  # median_entropy: the least τ_c, in normalised entropy

    @classmethod
    def for_step(
        cls, name: str, *, threshold: float, entropy_floor: float, old_channels: int, num_channels: int
    ) -> PseudoRule:
        """The rule of a step whose old model has `old_channels` and whose model has `num_channels` (background
        included); `entropy_floor` is in PLOP's unit (`plop_entropy_floor`)."""
        if name == "score":
            return cls(name, threshold=threshold)
        if name != "median_entropy":
            raise ValueError(f"unknown pseudo.rule {name!r}; expected one of {', '.join(PSEUDO_RULES)}")
        if num_channels > REJECTED_PSEUDO:
            raise ValueError(
                f"pseudo.rule=median_entropy marks the background pixels it rejects {REJECTED_PSEUDO}, a channel of "
                f"this step's {num_channels}-channel model (expected at most {REJECTED_PSEUDO} channels)"
            )
        return cls(name, entropy_floor=plop_entropy_floor(entropy_floor, old_channels, num_channels))


@dataclass(frozen=True)
class EntropyThresholds:
    """PLOP's τ_c of one step, per old channel c, in normalised entropy, and what they were computed from.

    τ_c = max(median_c, floor); a channel the old model never gives a background pixel has no median and
    gets the floor (PLOP's thresholds start at 0 before the floor is applied). Written beside the step's
    pseudo-labels (`to_json`), so a resumed step reads the thresholds that chose them.
    """

    floor: float
    pixels: tuple[int, ...]  # background pixels the old model gives each channel
    medians: tuple[float | None, ...]  # their median normalised entropy (None: no pixel)
    thresholds: tuple[float, ...]

    @classmethod
    def from_histogram(cls, histogram: np.ndarray, floor: float) -> EntropyThresholds:
        medians = histogram_medians(histogram)
        return cls(
            floor=float(floor),
            pixels=tuple(int(n) for n in np.asarray(histogram).sum(1)),
            medians=tuple(None if math.isnan(m) else float(m) for m in medians),
            thresholds=tuple(float(max(floor, 0.0 if math.isnan(m) else m)) for m in medians),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": "normalised entropy H / ln C_old",
            "floor": self.floor,
            "pixels": list(self.pixels),
            "medians": list(self.medians),
            "thresholds": list(self.thresholds),
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> EntropyThresholds:
        return cls(
            floor=float(document["floor"]),
            pixels=tuple(int(n) for n in document["pixels"]),
            medians=tuple(None if m is None else float(m) for m in document["medians"]),
            thresholds=tuple(float(t) for t in document["thresholds"]),
        )

    def summary(self) -> str:
        """One line for the log: each channel's τ_c (and how many background pixels set it)."""
        return ", ".join(f"{c}: {t:.4f} ({n} px)" for c, (t, n) in enumerate(zip(self.thresholds, self.pixels)))


def entropy_pseudo_labels(
    old_logits: torch.Tensor, label: torch.Tensor, thresholds: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """PLOP's rule: on background pixels (label 0) the old argmax channel c (0 included) where the normalised
    entropy is below τ_c, `REJECTED_PSEUDO` where it is not; 0 on every other pixel (the merge keeps their
    label). uint8 B x H x W.
    """
    _check_shapes(old_logits, label)
    channels = old_logits.shape[1]
    tau = torch.as_tensor(thresholds, dtype=torch.float32, device=old_logits.device)
    if tau.shape != (channels,):
        raise ValueError(f"expected one threshold per old channel ({channels}), got {tuple(tau.shape)}")
    winner = old_logits.argmax(1)
    accepted = normalised_entropy(old_logits) < tau[winner]
    decided = torch.where(accepted, winner, torch.full_like(winner, REJECTED_PSEUDO))
    return torch.where(label.to(winner.device) == 0, decided, torch.zeros_like(winner)).to(torch.uint8)


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
