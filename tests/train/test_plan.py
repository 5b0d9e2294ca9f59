"""How a step's chained-epoch stream is cut into epochs (eir.train.plan.iterations_per_epoch)."""

from __future__ import annotations

import itertools
import math

import pytest

from eir.train.plan import StepPlan, iterations_per_epoch


@pytest.mark.parametrize(("rows", "batch", "epochs"), [(32, 8, 3), (30, 8, 3), (362, 8, 10), (5, 8, 4), (1, 8, 2)])
def test_epochs_share_batches_at_their_seams(rows: int, batch: int, epochs: int) -> None:
    counts = iterations_per_epoch(rows, batch, epochs)
    assert len(counts) == epochs and min(counts) >= 1
    assert sum(counts) == max(epochs, math.ceil(epochs * rows / batch))


def test_whole_batches_give_equal_epochs() -> None:
    assert iterations_per_epoch(32, 8, 3) == [4, 4, 4]
    assert iterations_per_epoch(30, 8, 3) == [4, 4, 4]  # 90 rows = 11 full batches + one of 2
    assert iterations_per_epoch(20, 8, 2) == [3, 2]  # 40 rows = 5 batches


@pytest.mark.parametrize(("rows", "batch", "epochs"), [(33, 8, 1), (11, 8, 3), (17, 8, 1), (9, 8, 1)])
def test_a_training_batchnorm_never_gets_a_one_image_last_batch(rows: int, batch: int, epochs: int) -> None:
    assert (rows * epochs) % batch == 1
    full = iterations_per_epoch(rows, batch, epochs)
    counts = iterations_per_epoch(rows, batch, epochs, min_last_batch=2)
    assert sum(counts) == sum(full) - 1 == (rows * epochs) // batch, "the one-image batch is left unread"
    assert min(counts) >= 1
    assert iterations_per_epoch(34, 8, 1, min_last_batch=2) == [5], "a last batch of 2 is kept"
    assert _plan(0).min_last_batch == 2 and _plan(1).min_last_batch == 1  # step t > 0 freezes BatchNorm


def _plan(step: int, warmup_fraction: float = 0.0) -> StepPlan:
    return StepPlan(
        step=step,
        head_sizes=(15, 5)[: step + 1],
        backbone="mobilenet_v2",
        weights=None,
        output_stride=16,
        previous_model=None,
        epochs=1,
        global_batch=8,
        per_worker_batch=8,
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        num_train_rows=8,
        rows_per_epoch=8,
        num_eval_rows=8,
        eval_batch=8,
        old_channels=(),
        new_channels=(),
        amp=False,
        seed=0,
        warmup_fraction=warmup_fraction,
    )


def test_without_warmup_the_schedule_is_poly() -> None:
    plan = _plan(0)
    assert [plan.lr_factor(i, 10) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5**0.9, 0.0])


def test_warmup_ramps_linearly_then_decays_to_zero() -> None:
    plan = _plan(0, warmup_fraction=0.2)  # 100 iterations: 20 of warm-up, then poly over 80
    factors = [plan.lr_factor(i, 100) for i in range(101)]
    assert factors[:20] == pytest.approx([(i + 1) / 20 for i in range(20)])
    assert factors[20] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5**0.9) and factors[100] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(factors[19:]))


def test_old_parameters_lose_weight_decay_only_at_incremental_steps() -> None:
    assert _plan(0).old_weight_decay is None  # step 0: every parameter decays
    assert _plan(1).old_weight_decay == 0.0  # METHOD.md §2
