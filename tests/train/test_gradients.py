"""Per-epoch gradient statistics (eir.train.gradients) against norms computed by hand, on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from eir.config import load_config
from eir.train.experiment import run_experiment
from eir.train.gradients import GradientWatch


def _params(*grads: list[float] | None) -> list[torch.nn.Parameter]:
    params = []
    for grad in grads:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = None if grad is None else torch.tensor(grad)
        params.append(p)
    return params


def test_norms_are_the_global_l2_norm_of_every_gradient_by_hand() -> None:
    watch = GradientWatch(torch.device("cpu"))
    watch.observe(_params([3.0, 0.0], [0.0, 4.0], None))  # sqrt(9 + 16) = 5; a parameter without grad is left out
    watch.observe(_params([1.0, 0.0], [0.0, 0.0]))  # 1
    assert watch.epoch_metrics() == {"grad_norm_max": 5.0, "grad_norm_mean": 3.0, "skipped_steps": 0}
    assert watch.recent_norms() == [5.0, 1.0]


def test_non_finite_steps_are_counted_not_averaged_and_an_epoch_starts_afresh() -> None:
    watch = GradientWatch(torch.device("cpu"), recent=2)
    watch.observe(_params([6.0, 8.0]))  # 10
    watch.observe(_params([math.inf, 0.0]))
    watch.observe(_params([math.nan, 1.0]))
    assert watch.epoch_metrics() == {"grad_norm_max": 10.0, "grad_norm_mean": 10.0, "skipped_steps": 2}
    recent = watch.recent_norms()
    assert len(recent) == 2 and math.isinf(recent[0]) and math.isnan(recent[1])
    watch.start_epoch()
    assert watch.epoch_metrics() == {"grad_norm_max": 0.0, "grad_norm_mean": 0.0, "skipped_steps": 0}
    watch.observe(_params(None))  # no gradient at all: nothing observed
    assert watch.epoch_metrics()["skipped_steps"] == 0 and len(watch.recent_norms()) == 2


def test_the_norm_is_read_after_the_scaler_unscales() -> None:
    """Under a GradScaler the backward gradients are scaled; the worker observes after `unscale_`, which gives the
    real norm (observing before it would report the scale times the norm)."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((p * torch.tensor([3.0, 4.0])).sum()).backward()
    before, after = GradientWatch(torch.device("cpu")), GradientWatch(torch.device("cpu"))
    before.observe([p])
    scaler.unscale_(optimizer)
    after.observe([p])
    assert before.epoch_metrics()["grad_norm_max"] == pytest.approx(5.0 * 1024)
    assert after.epoch_metrics()["grad_norm_max"] == pytest.approx(5.0)


@pytest.mark.slow
def test_a_diverging_step_names_the_gradient_norms_before_it(ray_session, tiny_run, tmp_path) -> None:
    """A learning rate no model survives: the run stops at the first non-finite loss, and the error names the key
    to change and the global gradient norms and losses of the steps that led there."""
    overrides = [*tiny_run, "method.name=finetune", "train.lr=1e12", f"run.output_dir={tmp_path}", "run.name=d"]
    expected = r"gradient norms of the steps before it: \d.*\(their losses: \d.*train\.lr\)"
    with pytest.raises(Exception, match=expected) as failure:
        run_experiment(load_config(overrides=overrides), progress=False)
    assert "step 0, epoch 1" in str(failure.value)
