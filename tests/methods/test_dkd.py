"""DKD and DKD-M (eir/methods/dkd.py): every term against a per-pixel computation in plain Python, the decomposed
distillation on a real model against its heads' weights, what each term trains, the head init, the step-0 key
and DKD-M's presets."""

from __future__ import annotations

import math

import pytest
import torch

from eir.config import load_config
from eir.methods import LossInputs, StepShape, build_method, method_class
from eir.metrics import predict
from eir.model import build_model

DKD_OPTIONS = {
    "loss.pos_weight": 1.0,
    "loss.pos_weight_step0": 2.0,
    "loss.kd_weight": 5.0,
    "loss.dkd_pos_weight": 5.0,
    "loss.dkd_neg_weight": 5.0,
    "loss.ac_weight": 1.0,
    "model.new_head_init": "copy_background",
}


def dkd(name: str = "dkd", **changes: object):
    return build_method(name, {**DKD_OPTIONS, **{k.replace("__", "."): v for k, v in changes.items()}})


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def bce(z: float, y: float, pos_weight: float = 1.0) -> float:
    return -(pos_weight * y * math.log(sigmoid(z)) + (1 - y) * math.log(1 - sigmoid(z)))


def pixels(tensor: torch.Tensor):
    batch, _, height, width = tensor.shape
    return [(b, i, j) for b in range(batch) for i in range(height) for j in range(width)]


def bce_by_hand(logits: torch.Tensor, label: torch.Tensor, first_new: int, pos_weight: float) -> float:
    """Each new channel c: target 1 where label == c, else 0 (255 too); summed over channels, mean over pixels."""
    places = pixels(logits)
    total = sum(
        bce(float(logits[b, c, i, j]), float(int(label[b, i, j]) == c), pos_weight)
        for b, i, j in places
        for c in range(first_new, logits.shape[1])
    )
    return total / len(places)


def kd_by_hand(new: torch.Tensor, old: torch.Tensor) -> float:
    """Old foreground channels 1..C_old−1: BCE against the old sigmoid; summed over channels, mean over pixels."""
    places = pixels(old)
    total = sum(
        bce(float(new[b, c, i, j]), sigmoid(float(old[b, c, i, j])))
        for b, i, j in places
        for c in range(1, old.shape[1])
    )
    return total / len(places)


def ac_by_hand(logits: torch.Tensor) -> float:
    places = pixels(logits)
    return sum(bce(float(logits[b, 0, i, j]), 0.0) for b, i, j in places) / len(places)


def step_inputs(step: int, head_sizes: tuple[int, ...], seed: int = 0) -> LossInputs:
    """Random logits, step-t labels (0, C_t, some 255) and decomposed scores at a quarter of the resolution."""
    g = torch.Generator().manual_seed(seed)
    shape = StepShape(step, head_sizes)
    channels, old = shape.num_channels, shape.old_num_channels
    label = torch.randint(0, channels, (2, 4, 4), generator=g)
    label[label.lt(old) & label.ne(0)] = 0  # step-t labels hold 0 and C_t only
    label[0, 0, :2] = 255
    positive, negative = (torch.rand(2, channels, 1, 1, generator=g) * 4 * sign for sign in (1, -1))
    old_positive, old_negative = (torch.rand(2, old, 1, 1, generator=g) * 4 * sign for sign in (1, -1))
    return LossInputs(
        logits=torch.randn(2, channels, 4, 4, generator=g) * 3,
        label=label,
        shape=shape,
        old_logits=torch.randn(2, old, 4, 4, generator=g) * 3,
        features={"positive_logits": positive, "negative_logits": negative},
        old_features={"positive_logits": old_positive, "negative_logits": old_negative},
    )


@pytest.mark.parametrize(
    ("step", "head_sizes"),
    [(1, (3, 2)), (1, (3, 1)), (2, (2, 1, 1))],
    ids=["two-class step", "one-class step", "second one-class step"],
)
def test_each_dkd_term_equals_the_hand_computation(step: int, head_sizes: tuple[int, ...]) -> None:
    inputs = step_inputs(step, head_sizes)
    total, terms = dkd(loss__pos_weight=1.5).loss(inputs)
    old = inputs.shape.old_num_channels
    expected = {
        "bce": bce_by_hand(inputs.logits, inputs.label, old, 1.5),
        "ac": ac_by_hand(inputs.logits),
        "kd": kd_by_hand(inputs.logits, inputs.old_logits),
        "dkd_pos": kd_by_hand(inputs.features["positive_logits"], inputs.old_features["positive_logits"]),
        "dkd_neg": kd_by_hand(inputs.features["negative_logits"], inputs.old_features["negative_logits"]),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    weighted = expected["bce"] + expected["ac"] + 5 * (expected["kd"] + expected["dkd_pos"] + expected["dkd_neg"])
    assert total.item() == pytest.approx(weighted, rel=1e-5) and torch.isfinite(total)


def test_step0_is_bce_with_its_own_pos_weight_plus_ac_without_the_old_model() -> None:
    inputs = step_inputs(0, (5,))
    unit = dkd(loss__pos_weight=7.0)  # the t >= 1 value must not reach step 0
    total, terms = unit.loss(inputs)
    assert set(terms) == {"bce", "ac"} and not unit.needs_old_model(0) and unit.needs_old_model(1)
    assert terms["bce"].item() == pytest.approx(bce_by_hand(inputs.logits, inputs.label, 1, 2.0), rel=1e-5)
    assert total.item() == pytest.approx(terms["bce"].item() + terms["ac"].item(), rel=1e-6)
    assert unit.loss_weights(0) == {"bce": 1.0, "ac": 1.0}


def test_pos_weight_scales_the_positive_pixels_only() -> None:
    inputs = step_inputs(1, (3, 2))
    only_negatives = step_inputs(1, (3, 2))
    only_negatives.label = torch.zeros_like(only_negatives.label)
    for weight in (1.0, 2.0, 35.0):
        _, terms = dkd(loss__pos_weight=weight).loss(inputs)
        assert terms["bce"].item() == pytest.approx(bce_by_hand(inputs.logits, inputs.label, 4, weight), rel=1e-5)
    values = {weight: dkd(loss__pos_weight=weight).loss(only_negatives)[1]["bce"].item() for weight in (1.0, 35.0)}
    assert values[1.0] == pytest.approx(values[35.0], rel=1e-7)


def test_a_pure_255_batch_is_finite_and_trains_the_new_channels_down_like_background() -> None:
    """DKD's released BCE writes targets for every label but 0 and 255, then averages over every pixel: a 255
    pixel is a negative of each new class. The gradient of the new channels is σ(z) / pixels; old ones get 0."""
    inputs = step_inputs(1, (3, 2))
    inputs.label = torch.full_like(inputs.label, 255)
    inputs.logits.requires_grad_(True)
    total, terms = dkd(loss__kd_weight=0.0, loss__dkd_pos_weight=0.0, loss__dkd_neg_weight=0.0).loss(inputs)
    background = step_inputs(1, (3, 2))
    background.label = torch.zeros_like(background.label)
    assert terms["bce"].item() == pytest.approx(dkd().loss(background)[1]["bce"].item(), rel=1e-7)
    terms["bce"].backward()
    grad = inputs.logits.grad
    assert torch.isfinite(total) and torch.isfinite(grad).all()
    assert grad[:, :4].abs().sum() == 0, "the BCE leaves the old channels and the auxiliary channel alone"
    expected = torch.sigmoid(inputs.logits.detach()[:, 4:]) / (2 * 4 * 4)
    assert torch.allclose(grad[:, 4:], expected, rtol=1e-5)


def test_the_ac_term_trains_the_auxiliary_channel_alone() -> None:
    inputs = step_inputs(1, (3, 1))
    inputs.logits.requires_grad_(True)
    _, terms = dkd().loss(inputs)
    terms["ac"].backward()
    grad = inputs.logits.grad
    assert grad[:, 1:].abs().sum() == 0
    assert torch.allclose(grad[:, 0], torch.sigmoid(inputs.logits.detach()[:, 0]) / (2 * 4 * 4), rtol=1e-5)


def untouched(parameter: torch.nn.Parameter) -> bool:
    return parameter.grad is None or bool(parameter.grad.abs().sum() == 0)


def tiny_step1_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A step-0 model (heads 1 + 3) and its step-1 copy with DKD's new head of 2. Training-mode BatchNorm: a random
    network's running statistics shrink the decoder's features to ~1e-9 in eval mode, which would zero every part."""
    torch.manual_seed(0)
    old = build_model("mobilenet_v2", [3], weights=None)
    new = build_model("mobilenet_v2", [3], weights=None)
    new.load_state_dict(old.state_dict())
    dkd().init_new_head(new, 2)
    return old.requires_grad_(False), new


def test_dkd_old_channels_get_no_gradient_from_its_bce_on_a_real_model() -> None:
    _, model = tiny_step1_models()
    x = torch.randn(2, 3, 64, 64)
    logits, features = model(x, features=dkd().features)
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    label[:, 20:40, 20:40] = 4
    inputs = LossInputs(logits=logits, label=label, shape=StepShape(1, (3, 2)), features=features)
    _, terms = dkd(loss__kd_weight=0.0, loss__dkd_pos_weight=0.0, loss__dkd_neg_weight=0.0).loss(inputs)
    terms["bce"].backward()
    for index in (0, 1):
        assert untouched(model.heads[index].weight), f"head {index} moved under the BCE"
    assert model.heads[2].weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in model.decoder.parameters() if p.grad is not None) > 0


def test_the_decomposed_distillation_equals_a_computation_from_the_heads_weights() -> None:
    """At the decoder's resolution, channels 1..3 only: BCE(w⁺·f_new, σ(w⁺_old·f_old)) and the same for w⁻."""
    old, new = tiny_step1_models()
    with torch.no_grad():
        new.heads[1].weight.add_(0.05 * torch.randn_like(new.heads[1].weight))  # the new model has drifted
    x = torch.randn(2, 3, 64, 64)
    wanted = (*dkd().features, "decoder")
    logits, features = new(x, features=wanted)
    with torch.no_grad():
        old_logits, old_features = old(x, features=wanted)
    inputs = LossInputs(
        logits=logits,
        label=torch.zeros(2, 64, 64, dtype=torch.long),
        shape=StepShape(1, (3, 2)),
        old_logits=old_logits,
        features=features,
        old_features=old_features,
    )
    _, terms = dkd().loss(inputs)
    assert features["positive_logits"].shape[-2:] == (4, 4), "the parts are compared at the decoder's stride 16"
    for term, clamp in (("dkd_pos", {"min": 0}), ("dkd_neg", {"max": 0})):
        parts = []
        for model, decoded in ((new, features["decoder"]), (old, old_features["decoder"])):
            weight = model.heads[1].weight.detach().flatten(1).clamp(**clamp)  # C_0's head: the old classes
            parts.append(torch.einsum("ck,bkhw->bchw", weight, decoded.detach()))
        assert parts[0].abs().mean() > 0.1 and not torch.allclose(parts[0], parts[1], atol=1e-2), "a real comparison"
        padded = [torch.cat([torch.zeros_like(part[:, :1]), part], 1) for part in parts]  # channel 0 left out
        assert terms[term].item() == pytest.approx(kd_by_hand(*padded), rel=1e-4), term
    terms["dkd_pos"].backward()
    assert new.heads[1].weight.grad.abs().sum() > 0, "the decomposed distillation trains the old heads"
    assert untouched(new.heads[2].weight) and untouched(new.heads[0].weight)


def test_new_heads_copy_the_auxiliary_head() -> None:
    model = build_model("mobilenet_v2", [3], weights=None)
    with torch.no_grad():
        model.heads[0].bias.fill_(-2.5)
    dkd().init_new_head(model, 2)
    assert model.classes_per_step == [3, 2]
    assert torch.equal(model.heads[2].weight, model.heads[0].weight.expand_as(model.heads[2].weight))
    assert model.heads[2].bias.tolist() == [-2.5, -2.5]
    dkd(model__new_head_init="random").init_new_head(model, 1)
    assert not torch.equal(model.heads[3].weight[0], model.heads[0].weight[0])


def test_missing_old_outputs_are_named() -> None:
    inputs = step_inputs(1, (3, 2))
    inputs.old_features = {}
    with pytest.raises(ValueError, match="distils 'positive_logits' at step 1 but the new or old model's outputs lack"):
        dkd().loss(inputs)
    inputs.old_logits = None
    with pytest.raises(ValueError, match="distils at step 1 but got no old logits"):
        dkd().loss(inputs)
    only_logits = dkd(loss__dkd_pos_weight=0.0, loss__dkd_neg_weight=0.0)
    assert set(only_logits.loss(step_inputs(1, (3, 2)))[1]) == {"bce", "ac", "kd"}
    assert not dkd(loss__kd_weight=0.0, loss__dkd_pos_weight=0.0, loss__dkd_neg_weight=0.0).needs_old_model(1)


def test_dkd_step0_identity_is_its_own_and_keys_on_its_step0_options() -> None:
    identity = dkd().step0_identity()
    assert identity == {"family": "dkd", "loss.pos_weight_step0": 2.0, "loss.ac_weight": 1.0}
    assert dkd("dkd_m").step0_identity() == identity, "DKD-M trains DKD's step 0"
    others = {
        name: build_method(name, dict.fromkeys(method_class(name).option_keys, 0.0)).step0_identity()
        for name in ("eir", "mib")
    }
    assert identity not in others.values()
    assert dkd(loss__pos_weight_step0=1.0).step0_identity() != identity
    assert dkd(loss__ac_weight=0.0).step0_identity() != identity
    assert dkd(loss__kd_weight=1.0, loss__pos_weight=3.0).step0_identity() == identity


def test_dkd_m_presets_an_image_memory_relabelled_with_the_current_classes() -> None:
    dkd_m, plain = load_config(overrides=["method.name=dkd_m"]), load_config(overrides=["method.name=dkd"])
    assert (dkd_m.memory.kind, dkd_m.memory.size, dkd_m.replay.image_labels) == ("images", 100, "current")
    assert plain.memory.kind == "none" and not plain.pseudo.enabled and not plain.paste.enabled
    for config in (dkd_m, plain):
        assert config.model.new_head_init == "copy_background"
        assert config.replay.ratio == 0.0 and not config.pseudo.enabled and not config.paste.enabled
    for name in ("dkd", "dkd_m"):
        assert not {"loss.bce_weight", "loss.rskd_weight"} & set(method_class(name).presets), "the bce family's"
    overridden = load_config(overrides=["method.name=dkd_m", "memory.size=20"])
    assert overridden.memory.size == 20


def test_dkd_predicts_with_the_sigmoid_rule_and_a_detached_auxiliary_head() -> None:
    logits = step_inputs(1, (3, 2)).logits
    assert torch.equal(dkd().predict(logits), predict(logits))
    assert method_class("dkd").detach_background and method_class("dkd_m").detach_background
