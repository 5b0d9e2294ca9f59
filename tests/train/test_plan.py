"""How a step's chained-epoch stream is cut into epochs (eir.train.plan.iterations_per_epoch)."""

from __future__ import annotations

import math

import pytest

from eir.train.plan import iterations_per_epoch


@pytest.mark.parametrize(("rows", "batch", "epochs"), [(32, 8, 3), (30, 8, 3), (362, 8, 10), (5, 8, 4), (1, 8, 2)])
def test_epochs_share_batches_at_their_seams(rows: int, batch: int, epochs: int) -> None:
    counts = iterations_per_epoch(rows, batch, epochs)
    assert len(counts) == epochs and min(counts) >= 1
    assert sum(counts) == max(epochs, math.ceil(epochs * rows / batch))


def test_whole_batches_give_equal_epochs() -> None:
    assert iterations_per_epoch(32, 8, 3) == [4, 4, 4]
    assert iterations_per_epoch(30, 8, 3) == [4, 4, 4]  # 90 rows = 11 full batches + one of 2
    assert iterations_per_epoch(20, 8, 2) == [3, 2]  # 40 rows = 5 batches
