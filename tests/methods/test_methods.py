"""Each method unit (eir.methods): presets, options, loss on fixed tensors, head init, prediction.

The loss values are pinned from the worker loop before methods became units (bce_weight x BCE +
rskd_weight x RSKD on the same tensors), so the re-expression cannot drift unnoticed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from eir.config import ExperimentConfig
from eir.methods import METHOD_NAMES, LossInputs, Method, StepShape, build_method, method_class
from eir.metrics import predict
from eir.model import build_model

# The presets of the six methods as config.py held them before the methods became units.
ORIGINAL_PRESETS = {
    "finetune": ("none", False, False, 0.0, 0.0),
    "joint": ("none", False, False, 0.0, 0.0),
    "image_replay": ("images", False, False, 0.0, 0.0),
    "instance_replay": ("instances", False, False, None, 0.0),
    "eir_no_rskd": ("instances", True, True, None, 0.0),
    "eir": ("instances", True, True, None, 5.0),
}
PRESET_KEYS = ("memory.kind", "pseudo.enabled", "paste.enabled", "replay.ratio", "loss.rskd_weight")

# (paste, RSKD region) -> (BCE, RSKD), from the pre-unit worker loop on `fixed_batch()`.
PINNED = {
    (False, "new_gt"): (5.9648571, 0.1465493),
    (False, "all"): (5.9648571, 0.6168079),
    (False, "complement"): (5.9648571, 0.4702586),
    (True, "new_gt"): (5.9794674, 0.1465493),
    (True, "all"): (5.9794674, 0.6168079),
    (True, "complement"): (5.9794674, 0.4702586),
}


def fixed_batch(step: int = 1, paste: bool = False) -> LossInputs:
    """Seeded logits of a 6-channel model (step 1: heads 3+2, old model 1+3 channels), labels with ignore."""
    g = torch.Generator().manual_seed(7)
    batch, height, width = 2, 6, 5
    logits = torch.randn(batch, 6, height, width, generator=g) * 2
    old_logits = torch.randn(batch, 4, height, width, generator=g) * 2
    label = torch.randint(0, 6, (batch, height, width), generator=g)
    label[0, 0, :] = 255
    paste_class = torch.full((batch, height, width), 255, dtype=torch.uint8)
    paste_class[1, 2:4, 1:3] = 2
    paste_weight = torch.zeros(batch, height, width)
    paste_weight[1, 2:4, 1:3] = 0.6
    return LossInputs(
        logits=logits,
        label=label,
        shape=StepShape(step, (3, 2) if step else (5,)),  # six channels either way
        paste_class=paste_class if paste else None,
        paste_weight=paste_weight if paste else None,
        old_logits=old_logits,
    )


def options(method: str, **changes: object) -> dict:
    flat = ExperimentConfig().flat()
    flat.update({k: v for k, v in method_class(method).presets.items()})
    flat.update({k.replace("__", "."): v for k, v in changes.items()})
    return method_class(method).options_from(flat)


def test_the_six_methods_keep_their_presets() -> None:
    assert set(ORIGINAL_PRESETS) <= set(METHOD_NAMES)
    for name, values in ORIGINAL_PRESETS.items():
        assert tuple(method_class(name).presets[k] for k in PRESET_KEYS) == values, name
    assert [name for name in METHOD_NAMES if method_class(name).joint] == ["joint"]


@pytest.mark.parametrize("method", sorted(ORIGINAL_PRESETS))
@pytest.mark.parametrize(("paste", "region"), sorted(PINNED))
def test_loss_matches_the_pre_unit_loop(method: str, paste: bool, region: str) -> None:
    unit = build_method(method, options(method, loss__rskd_region=region, loss__bce_weight=1.5))
    total, terms = unit.loss(fixed_batch(step=1, paste=paste))
    bce, rskd = PINNED[paste, region]
    rskd_weight = ORIGINAL_PRESETS[method][4]
    assert terms["bce"].item() == pytest.approx(bce, abs=1e-6)
    assert ("rskd" in terms) == (rskd_weight > 0), "RSKD is a term only where it is trained"
    assert total.item() == pytest.approx(1.5 * bce + rskd_weight * rskd, abs=1e-5)
    assert unit.needs_old_model(1) == (rskd_weight > 0) and not unit.needs_old_model(0)


def test_the_unbiased_background_leaves_old_channels_to_the_distillation() -> None:
    """`loss.bce_old_background=skip`: the old channels get no BCE gradient on pixels labelled background (and not
    pasted), their gradient elsewhere is unchanged, and step 0 (no old channels) keeps EIR's loss exactly."""
    inputs = fixed_batch(step=1, paste=True)
    grads = {}
    for choice in ("push_down", "skip"):
        logits = inputs.logits.clone().requires_grad_(True)
        unit = build_method("eir", options("eir", loss__bce_old_background=choice, loss__rskd_weight=0.0))
        total, _ = unit.loss(dataclasses.replace(inputs, logits=logits))
        total.backward()
        grads[choice] = logits.grad
    unknown = (inputs.label == 0) & (inputs.paste_weight == 0)
    old = list(range(1, inputs.shape.old_num_channels))  # 1, 2, 3: the step-0 head's three classes
    others = [0, *range(inputs.shape.old_num_channels, inputs.shape.num_channels)]

    def per_channel(grad: torch.Tensor, channels: list[int]) -> torch.Tensor:  # C' x B x H x W
        return grad[:, channels].permute(1, 0, 2, 3)

    skip, push = per_channel(grads["skip"], old), per_channel(grads["push_down"], old)
    assert unknown.any() and (skip[:, unknown] == 0).all() and (push[:, unknown] != 0).all()
    known = ~unknown & (inputs.label != 255)
    assert torch.allclose(skip[:, known], push[:, known])
    assert torch.equal(grads["skip"][:, others], grads["push_down"][:, others])
    step0 = build_method("eir", options("eir", loss__bce_old_background="skip")).loss(fixed_batch(step=0))[0]
    assert step0.item() == pytest.approx(PINNED[False, "new_gt"][0], abs=1e-6)


@pytest.mark.parametrize("rskd_weight", [0.0, 5.0])
def test_skip_old_argmax_leaves_the_background_channel_where_the_old_model_sees_an_old_class(rskd_weight) -> None:
    """`skip_old_argmax` = `skip` plus no background-channel gradient on unknown background where the old model's
    argmax is an old class; every other gradient is `skip`'s. It reads the old model, so it asks for it even
    without distillation, and says so when the logits are missing."""
    inputs = fixed_batch(step=1, paste=True)
    grads = {}
    for choice in ("skip", "skip_old_argmax"):
        logits = inputs.logits.clone().requires_grad_(True)
        unit = build_method("eir", options("eir", loss__bce_old_background=choice, loss__rskd_weight=rskd_weight))
        assert unit.needs_old_model(1) == (choice == "skip_old_argmax" or rskd_weight > 0)
        assert not unit.needs_old_model(0)
        total, terms = unit.loss(dataclasses.replace(inputs, logits=logits))
        assert ("rskd" in terms) == (rskd_weight > 0)
        total.backward()
        grads[choice] = logits.grad
    unknown = (inputs.label == 0) & (inputs.paste_weight == 0)
    seen_old = unknown & (inputs.old_logits.argmax(1) > 0)
    assert seen_old.any() and (unknown & ~seen_old).any()
    background = grads["skip_old_argmax"][:, 0]
    assert (background[seen_old] == 0).all() and (grads["skip"][:, 0][seen_old] != 0).all()
    assert torch.equal(background[~seen_old], grads["skip"][:, 0][~seen_old])
    assert torch.equal(grads["skip_old_argmax"][:, 1:], grads["skip"][:, 1:])
    with pytest.raises(ValueError, match="reads the old model at step 1 but got no old logits"):
        build_method("eir", options("eir", loss__bce_old_background="skip_old_argmax", loss__rskd_weight=0.0)).loss(
            dataclasses.replace(inputs, old_logits=None)
        )


def test_step0_never_distils_whatever_the_weight() -> None:
    unit = build_method("eir", options("eir"))
    total, terms = unit.loss(fixed_batch(step=0))
    assert set(terms) == {"bce"} and total.item() == pytest.approx(PINNED[False, "new_gt"][0], abs=1e-6)


def test_a_distilling_method_without_old_logits_says_so() -> None:
    inputs = fixed_batch(step=1)
    inputs.old_logits = None
    with pytest.raises(ValueError, match="reads the old model at step 1 but got no old logits"):
        build_method("eir", options("eir")).loss(inputs)


def test_loss_gradient_reaches_the_logits() -> None:
    inputs = fixed_batch(step=1, paste=True)
    inputs.logits.requires_grad_(True)
    total, _ = build_method("eir", options("eir")).loss(inputs)
    total.backward()
    assert inputs.logits.grad is not None and inputs.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("init", ["random", "copy_background"])
def test_new_head_follows_the_configured_initialisation(init: str) -> None:
    model = build_model("mobilenet_v2", [3], weights=None)
    build_method("finetune", options("finetune", model__new_head_init=init)).init_new_head(model, 2)
    assert model.classes_per_step == [3, 2]
    copied = torch.equal(model.heads[2].weight, model.heads[0].weight.expand_as(model.heads[2].weight))
    assert copied == (init == "copy_background")


def test_prediction_is_the_sigmoid_background_rule() -> None:
    logits = fixed_batch().logits
    assert torch.equal(build_method("eir", options("eir")).predict(logits), predict(logits))


def test_unknown_method_and_missing_options_are_named() -> None:
    with pytest.raises(ValueError, match=rf"^unknown method 'no_such'; known methods: {', '.join(METHOD_NAMES)}$"):
        method_class("no_such")
    with pytest.raises(ValueError, match=r"needs the options \['loss.bce_old_background', 'loss.rskd_region'"):
        build_method("eir", {"loss.bce_weight": 1.0, "loss.rskd_weight": 5.0})


@pytest.fixture
def registry_restored():
    before = dict(Method.registry)
    yield
    Method.registry.clear()
    Method.registry.update(before)


def test_a_new_method_is_one_class(registry_restored: None) -> None:
    class NewOnly(Method):
        """A toy method: BCE on the step's own channels only (a loss the family above cannot express)."""

        name = "new_only_toy"

        def loss_weights(self, step: int) -> dict[str, float]:
            return {"new_bce": 1.0}

        def loss_terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
            channels = list(inputs.shape.current_channels)
            target = torch.zeros_like(inputs.logits[:, channels])
            return {"new_bce": torch.nn.functional.binary_cross_entropy_with_logits(inputs.logits[:, channels], target)}

    assert method_class("new_only_toy") is NewOnly
    total, terms = NewOnly({}).loss(fixed_batch())
    assert set(terms) == {"new_bce"} and total.item() > 0
    with pytest.raises(TypeError, match="two methods are named 'new_only_toy'"):
        type("Again", (Method,), {"name": "new_only_toy"})


def test_model_returns_the_features_a_method_asks_for() -> None:
    model = build_model("mobilenet_v2", [3], weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    logits, features = model(x, features=("decoder", "backbone"))
    assert torch.equal(logits, model(x)) and set(features) == {"decoder", "backbone"}
    assert features["decoder"].shape[1] == 256 and features["backbone"].shape[-1] == 4  # output stride 16
    with pytest.raises(ValueError, match="unknown feature"):
        model(x, features=("stage7",))


@pytest.mark.parametrize(
    ("backbone", "channels"), [("mobilenet_v2", (24, 32, 96, 1280)), ("resnet50", (256, 512, 1024, 2048))]
)
def test_model_returns_its_backbone_stages_and_decomposed_scores(backbone: str, channels: tuple[int, ...]) -> None:
    model = build_model(backbone, [3, 2], weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    wanted = ("stage1", "stage2", "stage3", "stage4", "decoder", "positive_logits", "negative_logits")
    logits, features = model(x, features=wanted)
    assert tuple(features[f"stage{i}"].shape[1] for i in range(1, 5)) == channels
    assert [features[f"stage{i}"].shape[-1] for i in range(1, 5)] == [16, 8, 4, 4]  # strides 4, 8, 16, 16
    positive, negative = features["positive_logits"], features["negative_logits"]
    assert positive.shape == negative.shape == (1, 6, 4, 4)
    bias = torch.cat([head.bias for head in model.heads]).view(1, -1, 1, 1)
    low_res = positive + negative + bias  # the two parts and the bias add up to the heads' scores
    expected = torch.nn.functional.interpolate(low_res, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-3)
    weights = torch.cat([head.weight for head in model.heads]).flatten(1)
    by_hand = torch.einsum("ck,khw->chw", weights.clamp(min=0), features["decoder"][0])
    assert torch.allclose(positive[0], by_hand, rtol=1e-4, atol=1e-3)
    assert bool((positive >= 0).all()) and bool((negative <= 0).all()), "the decoder's features are post-ReLU"


@pytest.mark.parametrize("detach", [True, False])
def test_the_background_head_shapes_the_features_only_when_not_detached(detach: bool) -> None:
    model = build_model("mobilenet_v2", [3], weights=None, detach_background=detach)
    model(torch.randn(2, 3, 64, 64))[:, 0].sum().backward()
    decoder_grad = sum(p.grad.abs().sum() for p in model.decoder.parameters() if p.grad is not None)
    assert (decoder_grad == 0) == detach


def test_the_readme_example_method_runs(registry_restored: None) -> None:
    """README's "Adding a method" snippet is a real method: it registers and trains only the new channels."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = readme.split("# eir/methods/new_only.py", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    unit = build_method("new_only", {})
    inputs = fixed_batch(step=1)
    inputs.logits.requires_grad_(True)
    total, terms = unit.loss(inputs)
    total.backward()
    assert set(terms) == {"bce_new"} and total.item() > 0
    old_grad, new_grad = inputs.logits.grad[:, :4], inputs.logits.grad[:, 4:]
    assert old_grad.abs().sum() == 0 and new_grad.abs().sum() > 0, "old channels are left alone"
