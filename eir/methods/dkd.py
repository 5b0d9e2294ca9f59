"""DKD (Baek et al., NeurIPS 2022; cvlab-yonsei/DKD, the code EIR forks) and DKD-M, its image-memory variant.

Sigmoid heads; the auxiliary background head reads detached decoder features (the model's default);
prediction by the sigmoid 0.5 rule (METHOD.md §1.5). Each term below is DKD's `trainer/trainer_voc.py`
and `models/loss.py` read line by line (commit 3779733); METHOD.md §4.1 lists the same decisions.

- **BCE on the new channels only** (DKD's `WBCELoss`, weight `mbce` = 1, fixed here): channel c of C_t has
  target 1 on pixels labelled c and 0 everywhere else — background, every other class and 255 alike: the
  released loss skips only 0 and 255 when it writes the targets, so 255 pixels are negatives of every new
  class and count in the mean. Old channels and the auxiliary channel are not in it, so they get no gradient
  from it. `pos_weight` multiplies the positive term: `loss.pos_weight_step0` (2, DKD's VOC scripts) at
  step 0, `loss.pos_weight` (1, `config_voc.json`; 35 in `config_ade.json`) after.
- **KD** (weight `loss.kd_weight`, 5): BCE of the new model's logits of the old *foreground* channels
  1..C_old−1 against the old model's sigmoids of the same channels (`logit[:, 1:n_old + 1]` against
  `logit_old[:, 1:].sigmoid()`); the auxiliary channel 0 is not distilled. At the image resolution.
- **Decomposed KD** (weights `loss.dkd_pos_weight`, `loss.dkd_neg_weight`, 5 and 5): the same BCE between the
  new and old models' scores of the old foreground channels computed with only the positive (resp. negative)
  weights of each head, without bias (the model's "positive_logits" / "negative_logits"), the old model's
  passed through a sigmoid. DKD's `pos_reg`/`neg_reg` skip the auxiliary head, so channel 0 is left out here
  too. At the decoder's resolution (stride 16), as DKD computes them: no upsampling.
- **AC** (weight `loss.ac_weight`, 1, every step including step 0): BCE of the auxiliary channel 0 against 0
  on every pixel (DKD's `ACLoss`). Its head reads detached features, so the term trains that head alone.
- **Reduction**, every term as the released code does it: BCE per pixel and channel, the mean over every
  pixel of the batch (B·H·W, no pixel excluded), then the sum over the term's channels
  (`.mean(dim=[0, 2, 3])` then `.sum()`). A batch of pure 255 pixels is therefore an ordinary batch of
  negatives: finite, and it trains the new channels down like background.
- **New heads** copy the auxiliary head (weights and bias; `model.new_head_init=copy_background`, the preset).
  DKD's `train_voc.py` copies only when its `ac` weight is > 0 and initialises randomly otherwise; here the
  head init stays its own knob (`model.new_head_init=random loss.ac_weight=0` is DKD's ablation).
- **Step 0** trains BCE (with `pos_weight_step0`) + AC: another step 0 than the `bce` family's (no `pos_weight`,
  background in the BCE, no AC), so its cache entry is keyed on the family and those two options.

DKD-M adds M = 100 stored images per step (`memory.kind=images`, `memory.size=100`), relabelled with the
current step's classes only (`replay.image_labels=current`; DKD's memory dataset masks every class but the
current ones to 0, as it does the step's own images). Under a BCE of the new channels only, an old object
labelled 0 in a stored image is a negative of the new classes, not of its own class, so the masking is sound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from eir.losses import soft_targets
from eir.methods.base import LossInputs, Method, frozen
from eir.methods.bce_distillation import NO_EXTRAS

if TYPE_CHECKING:
    from eir.model import IncrementalDeepLabV3

# Each distillation term and the config key of its weight.
DISTILLATION_WEIGHTS = {"kd": "loss.kd_weight", "dkd_pos": "loss.dkd_pos_weight", "dkd_neg": "loss.dkd_neg_weight"}
# The model's decomposed scores each decomposed term compares.
DECOMPOSED_FEATURES = {"dkd_pos": "positive_logits", "dkd_neg": "negative_logits"}


def channel_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    """DKD's reduction: BCE per pixel and channel, the mean over every pixel, summed over the channels.

    `logits` and `targets` are B x C x H x W; `pos_weight` multiplies the positive term
    (−[p·y·log σ(z) + (1 − y)·log(1 − σ(z))]).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    per_element = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=weight, reduction="none"
    )
    return per_element.sum(1).mean()


def new_channel_bce(inputs: LossInputs, pos_weight: float) -> torch.Tensor:
    """BCE of the step's own channels C_t: 1 on their pixels, 0 on every other pixel, 255 included.

    DKD reads no pasted targets (its `stream_extras` is empty, so the config refuses pasting for it).
    """
    shape = inputs.shape
    targets, _ = soft_targets(inputs.label, shape.num_channels)
    first_new = shape.old_num_channels
    return channel_bce(inputs.logits[:, first_new:], targets[:, first_new:], pos_weight)


def distillation(new_scores: torch.Tensor, old_scores: torch.Tensor, old_num_channels: int) -> torch.Tensor:
    """BCE of the new model's scores of the old foreground channels 1..C_old−1 against the old model's sigmoids.

    `old_scores` holds the old model's C_old channels (auxiliary channel 0 included, and left out).
    """
    if old_scores.shape[1] != old_num_channels or new_scores.shape[1] < old_num_channels:
        raise ValueError(
            f"old scores have {old_scores.shape[1]} channels and new ones {new_scores.shape[1]}; "
            f"expected {old_num_channels} old channels and at least as many new"
        )
    targets = torch.sigmoid(old_scores[:, 1:].detach().float())
    return channel_bce(new_scores[:, 1:old_num_channels], targets)


def auxiliary_loss(logits: torch.Tensor) -> torch.Tensor:
    """DKD's AC term: the auxiliary channel 0 pushed to 0 on every pixel."""
    background = logits[:, :1]
    return channel_bce(background, torch.zeros_like(background, dtype=torch.float32))


class Dkd(Method):
    """BCE(new channels) + AC, and at t ≥ 1 KD + decomposed KD from the frozen step t−1 model."""

    name = "dkd"
    step0_family = "dkd"
    presets = frozen({**NO_EXTRAS, "model.new_head_init": "copy_background"})
    option_keys = (
        "loss.pos_weight",
        "loss.pos_weight_step0",
        *DISTILLATION_WEIGHTS.values(),
        "loss.ac_weight",
        "model.new_head_init",
    )
    features = ("positive_logits", "negative_logits")

    def step0_identity(self) -> dict[str, Any]:
        step0 = ("loss.pos_weight_step0", "loss.ac_weight")
        return {**super().step0_identity(), **{key: self.options[key] for key in step0}}

    def _distillation_weights(self, step: int) -> dict[str, float]:
        if step == 0:
            return {}
        weights = {term: float(self.options[key]) for term, key in DISTILLATION_WEIGHTS.items()}
        return {term: weight for term, weight in weights.items() if weight > 0}

    def needs_old_model(self, step: int) -> bool:
        return bool(self._distillation_weights(step))

    def loss_weights(self, step: int) -> dict[str, float]:
        return {"bce": 1.0, "ac": float(self.options["loss.ac_weight"]), **self._distillation_weights(step)}

    def loss_terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        step = inputs.shape.step
        pos_weight = self.options["loss.pos_weight_step0" if step == 0 else "loss.pos_weight"]
        terms = {"bce": new_channel_bce(inputs, float(pos_weight)), "ac": auxiliary_loss(inputs.logits)}
        distilled = self._distillation_weights(step)
        if not distilled:
            return terms
        if inputs.old_logits is None:
            raise ValueError(f"method {self.name!r} distils at step {step} but got no old logits")
        old_channels = inputs.shape.old_num_channels
        if "kd" in distilled:
            terms["kd"] = distillation(inputs.logits, inputs.old_logits, old_channels)
        for term, feature in DECOMPOSED_FEATURES.items():
            if term in distilled:
                if feature not in inputs.features or feature not in inputs.old_features:
                    raise ValueError(
                        f"method {self.name!r} distils {feature!r} at step {step} but the new or old model's "
                        f"outputs lack it (features asked: {self.features})"
                    )
                terms[term] = distillation(inputs.features[feature], inputs.old_features[feature], old_channels)
        return terms

    def init_new_head(self, model: IncrementalDeepLabV3, num_classes: int) -> None:
        model.add_step_head(num_classes, init=self.options["model.new_head_init"])


class DkdM(Dkd):
    """DKD with M stored images, relabelled with the current step's classes only."""

    name = "dkd_m"
    presets = frozen({**Dkd.presets, "memory.kind": "images", "memory.size": 100, "replay.image_labels": "current"})
