"""Score a model on a stream of test batches: one confusion matrix, reduced by eir.metrics.

Shared by the Ray Train workers (after a step's last epoch, matrices all-reduced across
workers) and by `launch.py evaluate` (one process, any dataset split).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from eir.progress import progress as progress_bar

from eir.data.transforms import normalize, pad_batch
from eir.metrics import ConfusionMatrix, predict


@torch.no_grad()
def confusion_on_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, np.ndarray]],
    num_channels: int,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    amp: bool = False,
    progress: bool = False,
    total: int | None = None,
) -> np.ndarray:
    """Accumulate the confusion matrix over the batches this rank owns (every world_size-th).

    Batches hold object arrays of full-size images/labels (sizes may differ); they are padded
    per batch with ignore labels, so padding never reaches the metric.
    """
    model.eval()
    matrix = ConfusionMatrix(num_channels)
    for index, batch in enumerate(progress_bar(batches, "evaluate", total=total, enabled=progress, unit="batch")):
        if index % world_size != rank:
            continue
        images, labels = pad_batch(list(batch["image"]), list(batch["label"]))
        x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).to(device))
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(x)
        matrix.accumulate(predict(logits.float()).cpu(), torch.from_numpy(labels))
    return matrix.matrix
