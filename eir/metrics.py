"""Segmentation metrics for continual steps: accumulate a confusion matrix, then reduce it.

The split follows mmsegmentation: `ConfusionMatrix.accumulate` is called per batch (on the
batch's device, no host sync), the matrices of all workers are summed (`merge`, or an
all-reduce of `ConfusionMatrix.tensor`), and `reduce_scores` turns the total into the numbers
METHOD.md §1 asks for. Means are taken over the whole test set's matrix, never averaged per
image.

Class ids are the contiguous ids of the step's label space: 0 = background, then the classes
in step order (C_0, C_1, ...), so the matrix at step t is (1 + |C_seen|) x (1 + |C_seen|).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

from eir.labels import IGNORE_LABEL


def predict(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class map from sigmoid-head logits (B x C x H x W) -> B x H x W int64.

    METHOD.md §1: the class is the argmax over the foreground channels 1..C-1; a pixel whose
    best foreground sigmoid score is below `threshold` is background 0. The background
    channel's own score is not consulted. The same rule with threshold 0.7 over the old
    model's logits gives the pseudo-labels of §3.3 step 1.
    """
    if logits.dim() != 4:
        raise ValueError(f"predict expects logits of shape B x C x H x W, got {tuple(logits.shape)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold is a sigmoid score and must lie in (0, 1), got {threshold}")
    batch, channels, height, width = logits.shape
    if channels < 2:
        return torch.zeros((batch, height, width), dtype=torch.int64, device=logits.device)
    best, index = logits[:, 1:].max(dim=1)
    # sigmoid is monotonic, so compare logits with the threshold's logit (no sigmoid pass).
    confident = best >= math.log(threshold / (1.0 - threshold))
    return torch.where(confident, index + 1, torch.zeros_like(index))


def softmax_predict(logits: torch.Tensor) -> torch.Tensor:
    """Class map from softmax-head logits (B x C x H x W) -> B x H x W int64: the argmax over 0..C-1.

    The rule of MiB and PLOP, whose background channel competes with every class.
    """
    if logits.dim() != 4:
        raise ValueError(f"softmax_predict expects logits of shape B x C x H x W, got {tuple(logits.shape)}")
    return logits.argmax(dim=1)


@overload
def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_LABEL
) -> torch.Tensor: ...


@overload
def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE_LABEL
) -> np.ndarray: ...


def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_LABEL):
    """Confusion matrix of one batch: rows = ground truth, columns = prediction.

    Returns a `num_classes` x `num_classes` int64 matrix of the same kind as the inputs
    (a tensor stays on its device; an array stays an array). Pixels whose target is
    `ignore_index` are dropped; any other value outside 0..num_classes-1 is an error, since
    it means the label space and the model disagree.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if isinstance(pred, torch.Tensor):
        pred_t, target_t = pred.long().flatten(), target.to(pred.device).long().flatten()
        keep = target_t != ignore_index
        pred_t, target_t = pred_t[keep], target_t[keep]
        _check_range(pred_t, target_t, num_classes, ignore_index)
        counts = torch.bincount(target_t * num_classes + pred_t, minlength=num_classes**2)
        return counts.reshape(num_classes, num_classes)
    pred_a = np.asarray(pred).astype(np.int64).ravel()
    target_a = np.asarray(target).astype(np.int64).ravel()
    keep = target_a != ignore_index
    pred_a, target_a = pred_a[keep], target_a[keep]
    _check_range(pred_a, target_a, num_classes, ignore_index)
    counts = np.bincount(target_a * num_classes + pred_a, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _check_range(pred, target, num_classes: int, ignore_index: int) -> None:
    for name, values in (("prediction", pred), ("target", target)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)]
            raise ValueError(
                f"{name} holds class {int(bad[0])} outside 0..{num_classes - 1}"
                + (f" (target may also hold {ignore_index} = ignore)" if name == "target" else "")
            )


class ConfusionMatrix:
    """A running confusion matrix over a test set.

    The sum lives as an int64 tensor on the device of the first batch, so accumulation
    never waits for the GPU. To combine workers, either all-reduce `tensor` in place
    (`torch.distributed.all_reduce(cm.tensor)`) or `merge` matrices gathered elsewhere.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_LABEL) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.tensor = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def accumulate(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch (class maps of equal shape)."""
        batch = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if self.tensor.device != batch.device:
            self.tensor = self.tensor.to(batch.device)
        self.tensor += batch

    def merge(self, other: ConfusionMatrix | torch.Tensor | np.ndarray) -> None:
        """Add another worker's matrix (same classes)."""
        counts = torch.as_tensor(other.tensor if isinstance(other, ConfusionMatrix) else other)
        if counts.shape != self.tensor.shape:
            raise ValueError(
                f"cannot merge a {tuple(counts.shape)} confusion matrix into a "
                f"{tuple(self.tensor.shape)} one (different number of classes)"
            )
        self.tensor += counts.to(device=self.tensor.device, dtype=torch.int64)

    def reset(self) -> None:
        self.tensor = torch.zeros_like(self.tensor)

    @property
    def matrix(self) -> np.ndarray:
        """The accumulated counts as a host int64 array."""
        return self.tensor.cpu().numpy().copy()


@dataclass
class StepScores:
    """Scores of one step, in percent.

    Means skip NaN classes (no ground truth and no prediction). A mean over an empty group
    is None (no new classes at step 0; no old foreground classes without a background
    class); a mean over a group whose classes are all NaN is NaN.
    """

    per_class_iou: dict[int, float]  # every scored class; NaN where it never appears, 0 where
    # it has no ground truth but is predicted (false positives are still penalised)
    mIoU_all: float  # {0} ∪ seen (seen only, when background is not a class)
    mIoU_old: float | None  # {0} ∪ C_0
    mIoU_new: float | None  # C_1 ∪ … ∪ C_t
    hIoU: float | None  # harmonic mean of old and new
    mIoU_all_fg: float | None  # seen classes without 0 (MiB convention)
    mIoU_old_fg: float | None  # C_0 without 0
    pixel_accuracy: float  # correct / all non-ignored pixels

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat name -> value map for trackers; None values are left out."""
        values: dict[str, float | None] = {
            "mIoU_all": self.mIoU_all,
            "mIoU_old": self.mIoU_old,
            "mIoU_new": self.mIoU_new,
            "hIoU": self.hIoU,
            "mIoU_all_fg": self.mIoU_all_fg,
            "mIoU_old_fg": self.mIoU_old_fg,
            "pixel_accuracy": self.pixel_accuracy,
        }
        values.update({f"IoU_{c}": iou for c, iou in self.per_class_iou.items()})
        return {f"{prefix}{name}": value for name, value in values.items() if value is not None}


def reduce_scores(
    matrix: np.ndarray,
    old_classes: Sequence[int],
    new_classes: Sequence[int],
    background_is_class: bool = True,
) -> StepScores:
    """Per-class IoU and the old/new/all/hIoU means of METHOD.md §1 from a summed matrix.

    `old_classes` is C_0 *without* 0 (0 joins the old group when `background_is_class`);
    `new_classes` is C_1 ∪ … ∪ C_t (empty at step 0). Together they must be exactly the
    matrix's classes 1..N-1, which catches a matrix built for another step. With
    `background_is_class=False` (ADE20K with `dataset.ade_ignore_other=true`: label 0 has no ground
    truth) class 0 is scored nowhere.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {counts.shape}")
    old, new = [int(c) for c in old_classes], [int(c) for c in new_classes]
    _check_groups(old, new, counts.shape[0])

    intersection = np.diag(counts)
    union = counts.sum(axis=0) + counts.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = 100.0 * intersection / union  # 0/0 -> NaN: the class never appears

    background = [0] if background_is_class else []
    scored = background + old + new
    total = counts.sum()
    old_mean, new_mean = _mean(iou, background + old), _mean(iou, new)
    return StepScores(
        per_class_iou={c: float(iou[c]) for c in sorted(scored)},
        mIoU_all=_mean(iou, scored),
        mIoU_old=old_mean,
        mIoU_new=new_mean,
        hIoU=_harmonic(old_mean, new_mean),
        mIoU_all_fg=_mean(iou, old + new),
        mIoU_old_fg=_mean(iou, old),
        pixel_accuracy=float(100.0 * intersection.sum() / total) if total else math.nan,
    )


def _check_groups(old: list[int], new: list[int], num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"a {num_classes} x {num_classes} confusion matrix has no foreground class")
    overlap = sorted(set(old) & set(new))
    if overlap:
        raise ValueError(f"classes {overlap} are listed as both old and new")
    given, expected = sorted(old + new), list(range(1, num_classes))
    if given != expected:
        raise ValueError(
            f"old + new classes {given} must be exactly the matrix's foreground classes "
            f"1..{num_classes - 1} (the matrix is {num_classes} x {num_classes})"
        )


def _mean(iou: np.ndarray, classes: list[int]) -> float | None:
    """nanmean over a group; None for an empty group, NaN when every class is NaN."""
    if not classes:
        return None
    values = iou[classes]
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _harmonic(old: float | None, new: float | None) -> float | None:
    if old is None or new is None:
        return None
    if math.isnan(old) or math.isnan(new):
        return math.nan
    if old == 0.0 or new == 0.0:
        return 0.0
    return 2.0 * old * new / (old + new)


def mean_over_steps(values: Sequence[float]) -> float:
    """Mean of a per-step score (e.g. mIoU_all at every step), the sequence's summary number."""
    if len(values) == 0:
        raise ValueError("mean_over_steps needs at least one step's value")
    return float(np.mean(np.asarray(values, dtype=np.float64)))
