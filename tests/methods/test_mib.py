"""MiB (eir/methods/mib.py): unbiased cross-entropy by hand, its initialisation, softmax prediction."""

from __future__ import annotations

import math

import pytest
import torch

from eir.losses import unbiased_cross_entropy, unbiased_cross_entropy_map
from eir.methods import LossInputs, StepShape, build_method, method_class
from eir.model import build_model


def mib(**options: float):
    return build_method("mib", {"loss.unkd_weight": 10.0, **options})


def by_hand(logits: torch.Tensor, label: torch.Tensor, background_channels: int) -> float:
    """Per pixel, with plain Python: -log Σ_{c<background_channels} p_c where y < background_channels (background
    and old classes, as MiB's code maps them), -log p_y else, 0 on 255; mean over every pixel (MiB's train.py)."""
    total, count = 0.0, 0
    batch, channels, height, width = logits.shape
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                y = int(label[b, i, j])
                count += 1
                if y == 255:
                    continue
                exps = [math.exp(float(logits[b, c, i, j])) for c in range(channels)]
                p = sum(exps[:background_channels]) if y < background_channels else exps[y]
                total += -math.log(p / sum(exps))
    return total / count


def test_unbiased_cross_entropy_equals_the_hand_computation() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 3, 4, generator=g) * 3
    label = torch.randint(0, 6, (2, 3, 4), generator=g)
    label[0, 0] = 255
    label[1, 1, :2] = 0
    for background_channels in (1, 2, 4):  # 1 = the plain cross-entropy of step 0
        value = unbiased_cross_entropy(logits, label, background_channels).item()
        assert value == pytest.approx(by_hand(logits, label, background_channels), rel=1e-5)
    plain = torch.nn.functional.cross_entropy(logits, label, ignore_index=255, reduction="none").mean()
    assert unbiased_cross_entropy(logits, label, 1).item() == pytest.approx(plain.item(), rel=1e-6)


def test_unbiased_cross_entropy_on_a_pure_ignore_batch_is_zero_with_a_zero_gradient() -> None:
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = unbiased_cross_entropy(logits, torch.full((2, 3, 3), 255), 3)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    _, valid = unbiased_cross_entropy_map(logits, torch.full((2, 3, 3), 255), 3)
    assert not valid.any()


def test_unbiased_cross_entropy_names_a_label_outside_the_channels() -> None:
    with pytest.raises(ValueError, match="label holds class 7, outside the model's channels 0..3"):
        unbiased_cross_entropy(torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2), 7), 2)


def step_inputs(step: int, head_sizes: tuple[int, ...], seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    shape = StepShape(step, head_sizes)
    label = torch.randint(0, shape.num_channels, (2, 4, 4), generator=g)
    label[label.lt(shape.old_num_channels) & label.ne(0)] = 0  # step-t labels hold 0 and C_t only
    return LossInputs(
        logits=torch.randn(2, shape.num_channels, 4, 4, generator=g),
        label=label,
        shape=shape,
        old_logits=torch.randn(2, shape.old_num_channels, 4, 4, generator=g),
    )


@pytest.mark.parametrize("head_sizes", [(3, 2), (3, 1)], ids=["two-class step", "one-class step"])
def test_mib_loss_is_unbiased_ce_plus_ten_times_unbiased_distillation(head_sizes: tuple[int, ...]) -> None:
    inputs = step_inputs(1, head_sizes)
    total, terms = mib().loss(inputs)
    old_channels = 1 + head_sizes[0]
    assert terms["unce"].item() == pytest.approx(by_hand(inputs.logits, inputs.label, old_channels), rel=1e-5)
    # MiB's unbiased KD, by hand: the new model's background collects background and the new channels.
    log_p = torch.log_softmax(inputs.logits, 1)
    background = torch.logsumexp(torch.cat([log_p[:, :1], log_p[:, old_channels:]], 1), 1, keepdim=True)
    regrouped = torch.cat([background, log_p[:, 1:old_channels]], 1)
    expected_kd = -(torch.softmax(inputs.old_logits, 1) * regrouped).mean(1).mean()
    assert terms["unkd"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert total.item() == pytest.approx(terms["unce"].item() + 10 * terms["unkd"].item(), rel=1e-6)
    assert torch.isfinite(total)


def test_mib_step0_is_the_plain_cross_entropy_without_the_old_model() -> None:
    inputs = step_inputs(0, (5,))
    total, terms = mib().loss(inputs)
    assert set(terms) == {"unce"} and not mib().needs_old_model(0) and mib().needs_old_model(1)
    plain = torch.nn.functional.cross_entropy(inputs.logits, inputs.label)
    assert total.item() == pytest.approx(plain.item(), rel=1e-6)


def test_mib_initialisation_keeps_every_old_probability() -> None:
    """MiB's init: the new channels share the background's mass, so p(old class c) and p(bg ∪ new) are
    unchanged by adding the head — the model predicts exactly as before."""
    model = build_model("mobilenet_v2", [3], weights=None, detach_background=False).eval()
    with torch.no_grad():
        model.heads[0].bias.fill_(1.5)  # a background bias that is not 0, so the log(|C_t| + 1) shift shows
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = torch.softmax(model(x), 1)
        mib().init_new_head(model, 2)
        after = torch.softmax(model(x), 1)
    assert model.classes_per_step == [3, 2]
    assert torch.allclose(after[:, 1:4], before[:, 1:4], atol=1e-5)
    assert torch.allclose(after[:, 0] + after[:, 4:].sum(1), before[:, 0], atol=1e-5)
    assert torch.allclose(after[:, 4], after[:, 0], atol=1e-5), "each new channel starts as the background"
    assert model.heads[0].bias.item() == pytest.approx(1.5 - math.log(3))
    assert torch.equal(model.heads[2].weight, model.heads[0].weight.expand_as(model.heads[2].weight))


def test_mib_predicts_the_argmax_over_every_channel_and_trains_the_background_through_the_features() -> None:
    logits = torch.tensor([[[[3.0]], [[1.0]], [[2.0]]], [[[-1.0]], [[-2.0]], [[-3.0]]]])  # 2 images, 3 channels
    assert mib().predict(logits).flatten().tolist() == [0, 0]  # the sigmoid rule would say 2 and 0
    assert method_class("mib").detach_background is False and method_class("eir").detach_background is True


def test_methods_of_one_loss_family_share_step0_and_other_families_do_not() -> None:
    identities = {
        name: build_method(name, dict.fromkeys(method_class(name).option_keys, 0.0)).step0_identity()
        for name in ("finetune", "eir", "image_replay", "mib")
    }
    assert identities["finetune"] == identities["eir"] == identities["image_replay"] == {"family": "bce"}
    assert identities["mib"] == {"family": "softmax_ce"}
