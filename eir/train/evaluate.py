"""Score a model on a stream of test batches: one confusion matrix, reduced by eir.metrics.

Shared by the Ray Train workers (after a step's last epoch, matrices all-reduced across
workers) and by `launch.py evaluate` (one process, any dataset split).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from eir import metrics
from eir.data.transforms import logits_by_size
from eir.metrics import ConfusionMatrix
from eir.progress import progress as progress_bar


@torch.no_grad()
def confusion_on_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, np.ndarray]],
    num_channels: int,
    device: torch.device,
    *,
    amp: bool = False,
    progress: bool = False,
    total: int | None = None,
    predict: Callable[[torch.Tensor], torch.Tensor] = metrics.predict,
) -> np.ndarray:
    """Accumulate the confusion matrix over `batches` (a Train worker's share of the test rows, or all of them).

    Batches hold full-size images/labels whose sizes may differ; each batch runs as one forward
    pass per image size (never padded), so an image's score does not depend on its batch.
    `predict` turns float logits B x C x H x W into the class map B x H x W (the method's rule).
    """
    model.eval()
    matrix = ConfusionMatrix(num_channels)
    for batch in progress_bar(batches, "evaluate", total=total, enabled=progress, unit="batch"):
        labels = batch["label"]
        for rows, logits in logits_by_size(model, batch["image"], device, amp=amp):
            matrix.accumulate(predict(logits).cpu(), torch.from_numpy(np.stack([labels[row] for row in rows])))
    return matrix.matrix
