"""Pseudo-labels from the frozen old model (METHOD.md §3.3 step 1, §4.1 PLOP).

Three rules (`pseudo.rule`), all on the pixels whose step-t label is background (0), all computed
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
- `score_quantile` (for EIR's sigmoid heads, issue 20): the old model's prediction c (its argmax over
  every channel) when c is a foreground channel whose sigmoid reaches τ_c = min(threshold, the
  q-quantile of c's score over the step's background pixels the old model predicts as c), read off a
  score histogram filled by the same kind of pass (`score_histogram`, `ScoreThresholds`). A class the
  old model scores confidently keeps the global threshold; one it never scores that high (CamVid's
  pole, sign and fence never reach 0.7) still has its most confident pixels labelled. 0 = none.

The per-class rules' thresholds are written beside the step's pseudo-labels (`thresholds_from_json`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch

from eir.labels import REJECTED_PSEUDO

PSEUDO_RULES = ("score", "median_entropy", "score_quantile")
# Bins of the normalised-entropy histogram over [0, 1]. PLOP's code bins its (differently scaled) entropy
# into 100 bins over [0, 1] of which its values reach only the first 100 / (C_old · ln C), 3 at VOC 15-1's
# first step (METHOD.md §4.1); 1000 bins of the [0, 1] entropy put τ_c within 0.001 of the exact median.
ENTROPY_BINS = 1000
# Bins of the sigmoid-score histogram over [0, 1] (`score_quantile`): τ_c within 0.001 of the exact quantile.
SCORE_BINS = 1000


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
    background = label == 0
    return _cell_counts(
        old_logits.argmax(1)[background], normalised_entropy(old_logits)[background], old_logits.shape[1], bins
    )


def _cell_counts(channel: torch.Tensor, value: torch.Tensor, channels: int, bins: int) -> np.ndarray:
    """Pixels counted by channel (row) and the bin of a [0, 1] value (column, `bins` equal bins): int64 C x bins."""
    column = (value * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(channel * bins + column, minlength=channels * bins)
    return counts.view(channels, bins).cpu().numpy().astype(np.int64)


def _prediction(old_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The old model's prediction per pixel (argmax over every channel, background included) and its sigmoid."""
    winner = old_logits.argmax(1)
    return winner, torch.sigmoid(old_logits.float().gather(1, winner.unsqueeze(1)).squeeze(1))


def histogram_quantiles(histogram: np.ndarray, q: float) -> np.ndarray:
    """Each row's q-quantile over [0, 1], interpolated linearly inside the bin that holds it; NaN for an empty row.

    The interpolation PLOP's code means for its medians (math.stackexchange 2591946, which it cites); its
    loop adds the bin's index instead of the bin's count to the running sum, which is not repeated here.
    """
    counts = np.asarray(histogram, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] < 1 or (counts < 0).any():
        raise ValueError(f"a histogram is C x bins of counts >= 0, got shape {counts.shape}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"a quantile lies in (0, 1), got {q}")
    bins = counts.shape[1]
    quantiles = np.full(counts.shape[0], np.nan)
    for row, row_counts in enumerate(counts):
        total = int(row_counts.sum())
        if total == 0:
            continue
        cumulative = np.cumsum(row_counts)
        wanted = q * total
        k = int(np.searchsorted(cumulative, wanted, side="left"))
        below = cumulative[k] - row_counts[k]
        quantiles[row] = (k + (wanted - below) / row_counts[k]) / bins
    return quantiles


def histogram_medians(histogram: np.ndarray) -> np.ndarray:
    """Each row's median (`histogram_quantiles` at 0.5): PLOP's τ_c before the floor."""
    return histogram_quantiles(histogram, 0.5)


def score_histogram(old_logits: torch.Tensor, label: torch.Tensor, bins: int = SCORE_BINS) -> np.ndarray:
    """The background pixels (label 0) the old model predicts as a foreground channel c (its argmax over every
    channel, background included), counted by c (row) and the bin of c's sigmoid score (column, `bins` equal
    bins over [0, 1]): int64 C_old x bins, row 0 empty. What `score_quantile`'s per-class thresholds are read
    from; histograms of several batches add up.
    """
    _check_shapes(old_logits, label)
    winner, score = _prediction(old_logits)
    counted = (label.to(winner.device) == 0) & (winner > 0)
    return _cell_counts(winner[counted], score[counted], old_logits.shape[1], bins)


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
    threshold: float = 0.7  # score: the sigmoid score a pseudo-label needs; score_quantile: the cap of every τ_c
    entropy_floor: float = 0.0  # median_entropy: the least τ_c, in normalised entropy
    quantile: float = 0.5  # score_quantile: the quantile of a class's scores that sets τ_c

    @property
    def per_class(self) -> bool:
        """Whether a pass of the old model over the step's images sets per-class thresholds first."""
        return self.name in HISTOGRAM_BINS

    @classmethod
    def for_step(
        cls,
        name: str,
        *,
        threshold: float,
        entropy_floor: float,
        old_channels: int,
        num_channels: int,
        quantile: float = 0.5,
    ) -> PseudoRule:
        """The rule of a step whose old model has `old_channels` and whose model has `num_channels` (background
        included); `entropy_floor` is in PLOP's unit (`plop_entropy_floor`)."""
        if name == "score":
            return cls(name, threshold=threshold)
        if name == "score_quantile":
            return cls(name, threshold=threshold, quantile=quantile)
        if name != "median_entropy":
            raise ValueError(f"unknown pseudo.rule {name!r}; expected one of {', '.join(PSEUDO_RULES)}")
        if num_channels > REJECTED_PSEUDO:
            raise ValueError(
                f"pseudo.rule=median_entropy marks the background pixels it rejects {REJECTED_PSEUDO}, a channel of "
                f"this step's {num_channels}-channel model (expected at most {REJECTED_PSEUDO} channels)"
            )
        return cls(name, entropy_floor=plop_entropy_floor(entropy_floor, old_channels, num_channels))


class _Thresholds:
    """What a per-class rule's thresholds share: written beside the step's pseudo-labels as JSON tagged with
    their rule (`thresholds_from_json` reads either kind back) and one log line. Subclasses are frozen
    dataclasses whose fields are numbers and tuples of numbers (None where a channel had no pixel)."""

    rule: ClassVar[str]
    unit: ClassVar[str]
    thresholds: tuple[float, ...]
    pixels: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            "rule": self.rule,
            "unit": self.unit,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]):
        values = {f.name: document[f.name] for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def summary(self) -> str:
        """One line for the log: each channel's τ_c (and how many background pixels set it)."""
        return ", ".join(f"{c}: {t:.4f} ({n} px)" for c, (t, n) in enumerate(zip(self.thresholds, self.pixels)))


@dataclass(frozen=True)
class EntropyThresholds(_Thresholds):
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

    rule: ClassVar[str] = "median_entropy"
    unit: ClassVar[str] = "normalised entropy H / ln C_old"


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


@dataclass(frozen=True)
class ScoreThresholds(_Thresholds):
    """`score_quantile`'s τ_c of one step per old channel c, as sigmoid scores, and what they were computed from.

    τ_c = min(cap, Q_q(c)): Q_q(c) is the q-quantile of c's score over the step's background pixels the old
    model predicts as c, taken at the lower edge of the histogram bin that holds it, and the cap is
    `pseudo.threshold`, so a class the old model scores confidently keeps EIR's global rule while one it never
    scores above the cap (CamVid's pole, sign, fence at 0.7) still gets at least its most confident 1 − q share
    labelled. The lower edge, not the position interpolated inside the bin (`quantiles`, kept for the record),
    because the bin's own pixels may all share one score: an interpolated τ_c would fall between them and the
    next bin and label none of them. A channel with no such pixel gets the cap; channel 0 (background) is never
    a pseudo-label and keeps the cap too.
    """

    cap: float
    quantile: float
    pixels: tuple[int, ...]  # background pixels the old model predicts as each channel
    quantiles: tuple[float | None, ...]  # their score's q-quantile (None: no pixel)
    thresholds: tuple[float, ...]

    @classmethod
    def from_histogram(cls, histogram: np.ndarray, quantile: float, cap: float) -> ScoreThresholds:
        if not 0.0 < cap < 1.0:
            raise ValueError(f"the cap is a sigmoid score in (0, 1), got {cap}")
        found = histogram_quantiles(histogram, quantile)
        bins = np.asarray(histogram).shape[1]
        edges = [math.nan if math.isnan(v) else math.floor(v * bins + 1e-9) / bins for v in found]
        return cls(
            cap=float(cap),
            quantile=float(quantile),
            pixels=tuple(int(n) for n in np.asarray(histogram).sum(1)),
            quantiles=tuple(None if math.isnan(v) else float(v) for v in found),
            thresholds=tuple(float(cap if math.isnan(v) else min(cap, v)) for v in edges),
        )

    rule: ClassVar[str] = "score_quantile"
    unit: ClassVar[str] = "sigmoid score"


ClassThresholds = EntropyThresholds | ScoreThresholds
HISTOGRAM_BINS = {"median_entropy": ENTROPY_BINS, "score_quantile": SCORE_BINS}


def class_histogram(rule: PseudoRule, old_logits: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """One batch's histogram that a per-class rule reads its thresholds from (they add up over batches)."""
    if rule.name == "median_entropy":
        return entropy_histogram(old_logits, label, HISTOGRAM_BINS[rule.name])
    if rule.name == "score_quantile":
        return score_histogram(old_logits, label, HISTOGRAM_BINS[rule.name])
    raise ValueError(f"pseudo.rule={rule.name!r} has no per-class thresholds")


def thresholds_from_histogram(rule: PseudoRule, histogram: np.ndarray) -> ClassThresholds:
    """A per-class rule's τ_c from the step's histogram (`class_histogram` summed over the step's images)."""
    if rule.name == "median_entropy":
        return EntropyThresholds.from_histogram(histogram, rule.entropy_floor)
    if rule.name == "score_quantile":
        return ScoreThresholds.from_histogram(histogram, rule.quantile, rule.threshold)
    raise ValueError(f"pseudo.rule={rule.name!r} has no per-class thresholds")


def thresholds_from_json(document: dict[str, Any]) -> ClassThresholds:
    """Thresholds written beside a step's pseudo-labels; files without a `rule` are PLOP's (written before
    score_quantile existed)."""
    kinds = {cls.rule: cls for cls in (EntropyThresholds, ScoreThresholds)}
    rule = document.get("rule", EntropyThresholds.rule)
    if rule not in kinds:
        raise ValueError(f"thresholds of an unknown pseudo-label rule {rule!r}; expected one of {', '.join(kinds)}")
    return kinds[rule].from_json(document)


def chosen_pseudo_labels(
    rule: PseudoRule, old_logits: torch.Tensor, label: torch.Tensor, thresholds: Sequence[float] | None
) -> torch.Tensor:
    """The pseudo-labels of one batch under the step's rule (`thresholds`: τ_c of a per-class rule)."""
    if not rule.per_class:
        return pseudo_labels(old_logits, label, rule.threshold)
    if thresholds is None:
        raise ValueError(f"pseudo.rule={rule.name!r} needs its per-class thresholds")
    if rule.name == "median_entropy":
        return entropy_pseudo_labels(old_logits, label, thresholds)
    return quantile_pseudo_labels(old_logits, label, thresholds)


def quantile_pseudo_labels(
    old_logits: torch.Tensor, label: torch.Tensor, thresholds: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """`score_quantile`: on background pixels (label 0) the old model's prediction c (argmax over every channel)
    when it is a foreground channel whose sigmoid reaches τ_c; 0 elsewhere. uint8 B x H x W (0 = none).
    """
    _check_shapes(old_logits, label)
    channels = old_logits.shape[1]
    tau = torch.as_tensor(thresholds, dtype=torch.float32, device=old_logits.device)
    if tau.shape != (channels,) or not bool(((tau > 0) & (tau < 1)).all()):
        raise ValueError(f"expected one sigmoid threshold in (0, 1) per old channel ({channels}), got {tau.tolist()}")
    winner, score = _prediction(old_logits)
    chosen = (label.to(winner.device) == 0) & (winner > 0) & (score >= tau[winner])
    return torch.where(chosen, winner, torch.zeros_like(winner)).to(torch.uint8)


def merge_pseudo(label, pseudo):
    """Training label with pseudo-labels filled into background pixels (works on numpy or torch).

    A sum is exact here — on every pixel one of the two terms is 0 — and takes half the time of selecting
    between the two maps (a data worker merges every pseudo-labelled crop).
    """
    return label + (label == 0) * pseudo


def pseudo_label_quality(confusion: np.ndarray, old_channels: Sequence[int]) -> dict[str, Any]:
    """Recall and precision (percent) of pseudo-labels per old channel, from a confusion matrix whose
    rows are the complete ground truth and columns the pseudo-label map (0 = none).

    An oracle diagnostic, not a score: the complete labels are exactly what the method may not see
    at step t. It says how much of the old classes the targets still carry, which bounds what a
    step can keep; recall that falls step after step explains forgetting that compounds with the
    number of steps. A channel with no pixel to recover (or none claimed) gets None, not 0.

    `as_other_old` is the share of a channel's pixels pseudo-labelled as *another* old class, `mostly_as`
    the most frequent of those classes (the lowest channel on ties; None when there is none) and
    `mostly_as_share` the share that went to it alone: missed recall that is not
    merely left to background but taught as a wrong old class — a hard BCE target against the true one,
    which is how CamVid's pavement erodes into road (BENCHMARKS.md).
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    old = [int(c) for c in old_channels]
    hits, truth, claimed = matrix.diagonal()[old], matrix[old].sum(axis=1), matrix[:, old].sum(axis=0)
    crossed = matrix[np.ix_(old, old)].copy()
    np.fill_diagonal(crossed, 0)  # row i: channel old[i]'s pixels claimed as each other old channel
    return {
        "recall_old": _percent(hits.sum(), truth.sum()),
        "precision_old": _percent(hits.sum(), claimed.sum()),
        "as_other_old": _percent(crossed.sum(), truth.sum()),
        "per_channel": {
            c: {
                "recall": _percent(h, t),
                "precision": _percent(h, p),
                "as_other_old": _percent(row.sum(), t),
                "mostly_as": old[int(row.argmax())] if row.any() else None,
                "mostly_as_share": _percent(row.max(), t) if row.any() else None,
                "pixels": int(t),
            }
            for c, h, t, p, row in zip(old, hits, truth, claimed, crossed)
        },
    }


def _percent(part: int, whole: int) -> float | None:
    return None if whole == 0 else 100.0 * float(part) / float(whole)
