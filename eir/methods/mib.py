"""MiB (Cermelli et al., CVPR 2020; fcdl94/MiB): modelling the background with softmax heads.

- Softmax over channels 0..C; the background head reads the features like any class.
- Unbiased cross-entropy: a pixel labelled background at step t may be background or any old class,
  so it scores log Σ p over {0} ∪ old channels (`eir.losses.unbiased_cross_entropy_map`). At step 0
  there are no old channels and it is the plain softmax cross-entropy.
- Unbiased distillation on every pixel: the new model's background collects the new channels. That is
  this project's RSKD with region `all` exactly (`eir.losses.rskd_loss`); weight `loss.unkd_weight` = 10,
  MiB's VOC setting (`loss_kd=10` in its scripts; METHOD.md §4.1).
- Initialisation: every new channel copies the background's weights, and the new channels' and the
  background's biases become b₀ − log(|C_t| + 1), so the background's probability mass is shared evenly
  between them and the old model's background probability is unchanged (`init_new_head`).
- Prediction: argmax over 0..C.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from eir.losses import rskd_loss, unbiased_cross_entropy
from eir.methods.base import LossInputs, Method, frozen
from eir.methods.bce_distillation import NO_EXTRAS
from eir.metrics import softmax_predict

if TYPE_CHECKING:
    from eir.model import IncrementalDeepLabV3


class SoftmaxMethod(Method):
    """Softmax heads (background a class like the others), MiB's initialisation, argmax prediction."""

    step0_family = "softmax_ce"
    detach_background = False

    def init_new_head(self, model: IncrementalDeepLabV3, num_classes: int) -> None:
        model.add_step_head(num_classes, init="copy_background")
        background, head = model.heads[0], model.heads[-1]
        with torch.no_grad():
            shared = background.bias - math.log(num_classes + 1)
            head.bias.copy_(shared.expand_as(head.bias))
            background.bias.copy_(shared)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return softmax_predict(logits)


class Mib(SoftmaxMethod):
    name = "mib"
    presets = frozen(NO_EXTRAS)
    option_keys = ("loss.unkd_weight",)

    def needs_old_model(self, step: int) -> bool:
        return step > 0 and self.options["loss.unkd_weight"] > 0

    def loss_weights(self, step: int) -> dict[str, float]:
        weights = {"unce": 1.0}
        if self.needs_old_model(step):
            weights["unkd"] = float(self.options["loss.unkd_weight"])
        return weights

    def loss_terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        terms = {"unce": unbiased_cross_entropy(inputs.logits, inputs.label, inputs.shape.old_num_channels)}
        if self.needs_old_model(inputs.shape.step):
            if inputs.old_logits is None:
                raise ValueError(f"method {self.name!r} distils at step {inputs.shape.step} but got no old logits")
            terms["unkd"] = rskd_loss(inputs.logits, inputs.old_logits)
        return terms
