"""PLOP (eir/methods/plop.py): Local POD and the adaptive cross-entropy against independent computations on tiny
tensors, the method's terms and weights, its shared step 0, and a tiny synthetic run through Ray (pseudo-labels by
the entropy rule, thresholds written with them and reused, the POD terms trained and logged)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from eir import storage
from eir.config import load_config
from eir.data.codec import decode_map
from eir.labels import REJECTED_PSEUDO
from eir.methods import LossInputs, StepShape, build_method, method_class
from eir.methods.plop import (
    POD_FEATURES,
    adaptive_cross_entropy,
    classifier_adaptive_factor,
    local_pod_distance,
    local_pod_embedding,
    logits_in_old_channels,
)
from eir.model import build_model
from eir.pseudo import EntropyThresholds, PseudoRule, plop_entropy_floor
from eir.tasks import get_task
from eir.train import step_data
from eir.train.experiment import run_experiment
from eir.train.planner import PreviousStep, RunFacts, RunLayout, plan_step
from eir.train.pseudo_quality import score_pseudo_labels
from eir.train.resolved import resolve


def plop(**options: float):
    return build_method("plop", {"loss.pod_weight": 0.01, "loss.pod_logits_weight": 0.0005, **options})


# ---------------------------------------------------------------- Local POD


def pod_by_hand(old: torch.Tensor, new: torch.Tensor, scales=(1, 2, 4)) -> float:
    """PLOP's `_local_pod` + frobenius distance, in plain Python loops over images, regions, channels and rows."""
    batch, channels, size, _ = old.shape
    total = 0.0
    for b in range(batch):
        squared = 0.0
        for scale in scales:
            k = size // scale
            if k == 0:
                continue
            for i in range(scale):
                for j in range(scale):
                    for c in range(channels):
                        a = [
                            [float(old[b, c, y, x]) ** 2 for x in range(j * k, (j + 1) * k)]
                            for y in range(i * k, (i + 1) * k)
                        ]
                        n = [
                            [float(new[b, c, y, x]) ** 2 for x in range(j * k, (j + 1) * k)]
                            for y in range(i * k, (i + 1) * k)
                        ]
                        for r in range(k):  # mean over the width, per row
                            squared += (sum(n[r]) / k - sum(a[r]) / k) ** 2
                        for col in range(k):  # mean over the height, per column
                            squared += (
                                sum(n[r][col] for r in range(k)) / k - sum(a[r][col] for r in range(k)) / k
                            ) ** 2
        total += math.sqrt(squared)
    return total / batch


def test_pod_of_identical_maps_is_zero_with_a_zero_gradient() -> None:
    old = torch.randn(2, 3, 8, 8)
    new = old.clone().requires_grad_(True)
    distance = local_pod_distance(old, new)
    distance.backward()
    assert distance.item() == 0 and torch.isfinite(new.grad).all() and new.grad.abs().sum() == 0


def test_pod_of_one_changed_pixel_by_hand() -> None:
    """A 4x4 map whose pixel (0, 0) goes from 0 to 2 (squared: 4). Scale 1: row 0's and column 0's means move by
    4/4 = 1; scale 2: the first 2x2 region's row 0 and column 0 move by 4/2 = 2; scale 4: the 1x1 region moves by 4
    twice. Distance = sqrt(1 + 1 + 4 + 4 + 16 + 16)."""
    old = torch.zeros(1, 1, 4, 4)
    new = old.clone()
    new[0, 0, 0, 0] = 2.0
    assert local_pod_distance(old, new).item() == pytest.approx(math.sqrt(42))
    assert local_pod_embedding(new).shape == (1, (4 + 4) + 4 * (2 + 2) + 16 * (1 + 1))  # 1, 4, 16 regions


@pytest.mark.parametrize("size", [8, 6, 3], ids=["divisible", "remainder left out", "scale 4 skipped"])
def test_pod_matches_plop_formula_on_random_maps(size: int) -> None:
    g = torch.Generator().manual_seed(size)
    old, new = torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size, size, generator=g)
    assert local_pod_distance(old, new).item() == pytest.approx(pod_by_hand(old, new), rel=1e-5)


def test_new_channels_logits_join_the_background() -> None:
    logits = torch.arange(6.0).view(1, 6, 1, 1)  # channels 0..3 old, 4 and 5 new
    assert logits_in_old_channels(logits, 4).flatten().tolist() == [0 + 4 + 5, 1, 2, 3]


# ---------------------------------------------------------------- the adaptive cross-entropy


def ce_by_hand(logits: torch.Tensor, label: torch.Tensor, old_channels: int) -> float:
    """Per pixel -log softmax at the label (254 and 255: 0), times the image's accepted / background share
    (1 without background), averaged over every pixel."""
    batch, channels, height, width = logits.shape
    total = 0.0
    for b in range(batch):
        values = [int(v) for v in label[b].flatten()]
        accepted = sum(v < old_channels for v in values)
        background = accepted + sum(v == REJECTED_PSEUDO for v in values)
        factor = accepted / background if background else 1.0
        for i in range(height):
            for j in range(width):
                y = int(label[b, i, j])
                if y in (REJECTED_PSEUDO, 255):
                    continue
                exps = [math.exp(float(logits[b, c, i, j])) for c in range(channels)]
                total += factor * -math.log(exps[y] / sum(exps))
    return total / (batch * height * width)


def merged_label(head_sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    """Step-t labels after the merge: new classes, accepted pseudo-labels (0 and old), rejected, void."""
    shape = StepShape(1, head_sizes)
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, shape.num_channels, (3, 4, 5), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.3] = REJECTED_PSEUDO
    label[0, 0, :2] = 255
    background = (label[2] < shape.old_num_channels) | (label[2] == REJECTED_PSEUDO)
    label[2] = torch.where(background, shape.num_channels - 1, label[2])  # an image without background
    label[2, 0, 0] = 255
    return label


@pytest.mark.parametrize("head_sizes", [(3, 2), (3, 1)], ids=["two-class step", "one-class step"])
def test_adaptive_cross_entropy_by_hand(head_sizes: tuple[int, ...]) -> None:
    label = merged_label(head_sizes, seed=len(head_sizes) + head_sizes[-1])
    old_channels = 1 + head_sizes[0]
    logits = torch.randn(3, 1 + sum(head_sizes), 4, 5, generator=torch.Generator().manual_seed(1)) * 2
    factor = classifier_adaptive_factor(label, old_channels)
    assert 0 < factor[0] < 1 and factor[2] == 1.0, "a mixed image; an image without background keeps factor 1"
    value = adaptive_cross_entropy(logits, label, old_channels).item()
    assert value == pytest.approx(ce_by_hand(logits, label, old_channels), rel=1e-5)


def test_adaptive_cross_entropy_of_an_all_ignore_batch_is_zero_and_finite() -> None:
    label = torch.full((2, 3, 3), 255)
    label[1] = REJECTED_PSEUDO  # every background pixel rejected: factor 0
    logits = torch.randn(2, 5, 3, 3, requires_grad=True)
    loss = adaptive_cross_entropy(logits, label, 4)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    assert classifier_adaptive_factor(label, 4).tolist() == [1.0, 0.0]


def test_rejected_pixels_reach_no_loss_but_other_losses_refuse_them() -> None:
    logits = torch.randn(1, 5, 2, 2, requires_grad=True)
    label = torch.tensor([[[1, REJECTED_PSEUDO], [4, 0]]])
    adaptive_cross_entropy(logits, label, 4).backward()
    assert logits.grad[0, :, 0, 1].abs().sum() == 0 and logits.grad[0, :, 0, 0].abs().sum() > 0
    shape = StepShape(1, (3, 1))
    for name in ("mib", "eir"):
        method = build_method(name, dict.fromkeys(method_class(name).option_keys, 0.0) | {"loss.rskd_region": "all"})
        with pytest.raises(ValueError, match="label holds class 254, outside the model's channels 0..4"):
            method.loss(LossInputs(logits=logits.detach(), label=label, shape=shape))


# ---------------------------------------------------------------- the method


def step_inputs(head_sizes: tuple[int, ...], size: int = 8) -> LossInputs:
    """A step-1 batch with every feature PLOP reads, the new model's differing from the old one's."""
    g = torch.Generator().manual_seed(5)
    shape = StepShape(1, head_sizes)
    channels = {name: 4 for name in POD_FEATURES}
    old = {name: torch.randn(2, c, size, size, generator=g) for name, c in channels.items()}
    new = {name: value + 0.3 * torch.randn(value.shape, generator=g) for name, value in old.items()}
    old["head_logits"] = torch.randn(2, shape.old_num_channels, size, size, generator=g)
    new["head_logits"] = torch.randn(2, shape.num_channels, size, size, generator=g)
    label = merged_label(head_sizes, seed=3)[:2, :4, :4].repeat(1, 2, 2)[:, :size, :size]
    return LossInputs(
        logits=torch.randn(2, shape.num_channels, size, size, generator=g),
        label=label,
        shape=shape,
        old_logits=torch.randn(2, shape.old_num_channels, size, size, generator=g),
        features=new,
        old_features=old,
    )


@pytest.mark.parametrize("head_sizes", [(3, 2), (3, 1)], ids=["two-class step", "one-class step"])
def test_plop_loss_is_adaptive_ce_plus_scheduled_pod(head_sizes: tuple[int, ...]) -> None:
    inputs = step_inputs(head_sizes)
    total, terms = plop().loss(inputs)
    channels, new = 1 + sum(head_sizes), head_sizes[-1]
    schedule = math.sqrt(channels / new) / 6  # PLOP's POD schedule, then the mean over its six maps
    features = sum(pod_by_hand(inputs.old_features[n], inputs.features[n]) for n in POD_FEATURES)
    old_logits = inputs.old_features["head_logits"]
    folded = inputs.features["head_logits"][:, : 1 + head_sizes[0]].clone()
    folded[:, 0] += inputs.features["head_logits"][:, 1 + head_sizes[0] :].sum(1)
    assert terms["ce"].item() == pytest.approx(ce_by_hand(inputs.logits, inputs.label, 1 + head_sizes[0]), rel=1e-5)
    assert terms["pod"].item() == pytest.approx(schedule * features, rel=1e-5)
    assert terms["pod_logits"].item() == pytest.approx(schedule * pod_by_hand(old_logits, folded), rel=1e-5)
    expected = terms["ce"] + 0.01 * terms["pod"] + 0.0005 * terms["pod_logits"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6) and torch.isfinite(total)


def test_without_logits_pod_the_features_share_five_maps_and_without_pod_no_old_model() -> None:
    inputs = step_inputs((3, 2))
    _, terms = plop(**{"loss.pod_logits_weight": 0.0}).loss(inputs)
    _, full = plop().loss(inputs)
    assert set(terms) == {"ce", "pod"} and terms["pod"].item() == pytest.approx(full["pod"].item() * 6 / 5, rel=1e-6)
    none = plop(**{"loss.pod_weight": 0.0, "loss.pod_logits_weight": 0.0})
    assert not none.needs_old_model(1) and set(none.loss_weights(1)) == {"ce"}


def test_plop_step0_is_mibs_step0() -> None:
    g = torch.Generator().manual_seed(2)
    logits, label = torch.randn(2, 6, 4, 4, generator=g), torch.randint(0, 6, (2, 4, 4), generator=g)
    label[0, 0] = 255
    inputs = LossInputs(logits=logits, label=label, shape=StepShape(0, (5,)))
    total, terms = plop().loss(inputs)
    mib_total, _ = build_method("mib", {"loss.unkd_weight": 10.0}).loss(inputs)
    assert set(terms) == {"ce"} and total.item() == pytest.approx(mib_total.item(), rel=1e-7)
    assert not plop().needs_old_model(0) and plop().needs_old_model(1)
    assert plop().step0_identity() == build_method("mib", {"loss.unkd_weight": 10.0}).step0_identity()


def test_plop_presets_and_options() -> None:
    config = load_config(overrides=["method.name=plop"])
    assert (config.pseudo.enabled, config.pseudo.rule, config.pseudo.entropy_floor) == (True, "median_entropy", 0.001)
    assert (config.memory.kind, config.paste.enabled, config.replay.ratio) == ("none", False, 0.0)
    assert (config.loss.pod_weight, config.loss.pod_logits_weight) == (0.01, 0.0005)
    cls = method_class("plop")
    assert cls.detach_background is False and cls.features == (*POD_FEATURES, "head_logits")


def test_plop_initialisation_is_mibs_and_pod_starts_at_zero_on_the_features() -> None:
    """After MiB's initialisation the new model computes the old model's features exactly, so the first
    iteration's feature POD is 0 (the logits' is not: logits, not probabilities, are summed into background)."""
    torch.manual_seed(0)
    old = build_model("mobilenet_v2", [3], weights=None).eval()
    new = build_model("mobilenet_v2", [3], weights=None, detach_background=False)
    new.load_state_dict(old.state_dict())
    plop().init_new_head(new, 2)
    new.freeze_batchnorm()
    new.train()
    x = torch.randn(2, 3, 64, 64)
    logits, features = new(x, features=method_class("plop").features)
    with torch.no_grad():
        old_logits, old_features = old(x, features=method_class("plop").features)
    shape = StepShape(1, (3, 2))
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    inputs = LossInputs(logits, label, shape, old_logits=old_logits, features=features, old_features=old_features)
    _, terms = plop().loss(inputs)
    assert terms["pod"].item() == pytest.approx(0.0, abs=1e-6) and terms["pod_logits"].item() > 0
    assert torch.allclose(torch.softmax(old_logits, 1)[:, 1:4], torch.softmax(logits, 1)[:, 1:4], atol=1e-5)


@pytest.mark.parametrize(
    ("method", "step", "rule"),
    [
        ("plop", 1, PseudoRule("median_entropy", entropy_floor=0.001 * 16 * math.log(21))),  # VOC 15-5: 16 → 21
        ("plop", 0, None),
        ("eir", 1, PseudoRule("score", threshold=0.7)),
        ("mib", 1, None),
    ],
)
def test_the_planner_resolves_the_steps_pseudo_label_rule(method: str, step: int, rule: PseudoRule | None) -> None:
    config = load_config(overrides=[f"method.name={method}", "model.weights=null"])
    facts = RunFacts(RunLayout.of(config, get_task("voc", "15-5")), (100, 40), (50, 60), progress=False)
    design = plan_step(config, facts, step, PreviousStep("step_0/model.pt", 0) if step else None)
    assert design.pseudo_rule == rule and design.pseudo == (rule is not None)


# ---------------------------------------------------------------- a tiny run through Ray


@pytest.mark.slow
def test_plop_run_labels_with_the_entropy_rule_and_trains_pod(
    ray_session,
    tiny_run: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    config = load_config(overrides=[*tiny_run, "method.name=plop", "run.name=plop", f"run.output_dir={tmp_path}"])
    document = run_experiment(config, progress=False)
    assert document["status"] == "finished" and document["method"] == "plop"
    assert document["steps"][1]["mIoU_new"] is not None

    # The thresholds were written with the pseudo-labels: one per old channel, none below the converted floor.
    folder = tmp_path / "plop" / "step_1" / "pseudo"
    thresholds = EntropyThresholds.from_json(storage.read_json(storage.resolve(folder / "thresholds.json")))
    floor = plop_entropy_floor(0.001, 16, 21)
    assert len(thresholds.thresholds) == 16 and thresholds.floor == pytest.approx(floor)
    assert min(thresholds.thresholds) >= floor and sum(thresholds.pixels) > 0
    # Every background pixel got a decision (an old channel or rejected); other pixels keep their label.
    exp = resolve(config, progress=False, run_dir=storage.resolve(tmp_path / "plop"))
    lut = exp.design(1, PreviousStep("unused", 0)).stream.lut
    values = set()
    for part in folder.glob("*.parquet"):
        table = pq.read_table(part, columns=["label", "pseudo"])
        for label_bytes, pseudo_bytes in zip(table.column("label").to_pylist(), table.column("pseudo").to_pylist()):
            label, pseudo = lut[decode_map(label_bytes)], decode_map(pseudo_bytes)
            assert (pseudo[label != 0] == 0).all()
            values |= set(np.unique(pseudo[label == 0]).tolist())
    assert values <= {*range(16), REJECTED_PSEUDO} and values
    quality = score_pseudo_labels(str(tmp_path / "plop"), progress=False)  # rejected pixels count as unlabelled
    assert [entry["step"] for entry in quality["steps"]] == [1]

    # The step trained the adaptive CE and both POD terms, summed with their weights.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eir-synthetic-15-5"], output_format="list")
    step1 = next(r for r in runs if r.info.run_name == "plop/step_1")
    terms = {k: v for k, v in step1.data.metrics.items() if k.startswith("loss_")}
    assert set(terms) == {"loss_ce", "loss_pod", "loss_pod_logits"} and terms["loss_pod"] > 0
    weighted = terms["loss_ce"] + 0.01 * terms["loss_pod"] + 0.0005 * terms["loss_pod_logits"]
    assert step1.data.metrics["loss"] == pytest.approx(weighted, rel=1e-5)

    # A second attempt at the step reuses the pseudo-labels and their thresholds: no inference pass runs.
    def no_pass(*args, **kwargs):
        raise AssertionError("the histogram pass ran again")

    monkeypatch.setattr(step_data, "threshold_histogram_pass", no_pass)
    monkeypatch.setattr(step_data, "write_pseudo_labels", no_pass)
    design = exp.design(1, PreviousStep(exp.step_dir(0).join("model.pt").uri, 0))
    with caplog.at_level(logging.INFO, logger=step_data.__name__):
        rows = step_data.pseudo_labelled_rows(exp, design, exp.train_splits.step_ids(1))
    assert rows.count() == len(exp.train_splits.step_ids(1))
    assert "reusing the pseudo-labels" in caplog.text and thresholds.summary() in caplog.text
