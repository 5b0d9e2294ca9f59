"""The loss family of EIR and of the baselines it shares a protocol with (METHOD.md §3.4).

Sigmoid heads; multi-label BCE over every channel against soft targets (pasted pixels blend the
pasted class in); at t ≥ 1 optionally region-specific unbiased distillation (RSKD) from the
frozen step t−1 model. The six original methods differ only in the memory and stream extras
they switch on, so each is this loss with its own presets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from eir.losses import bce_loss, region_mask, rskd_loss, soft_targets, unknown_background
from eir.methods.base import LossInputs, Method

if TYPE_CHECKING:
    from eir.model import IncrementalDeepLabV3

# The stream extras every method of this family sets explicitly (so none inherits another's).
NO_EXTRAS = {"memory.kind": "none", "pseudo.enabled": False, "paste.enabled": False, "replay.ratio": 0.0}


class BceDistillation(Method):
    """bce_weight · BCE(all channels) + rskd_weight · RSKD(region), RSKD only at t ≥ 1; at t ≥ 1
    `loss.bce_old_background=skip` leaves the old channels out of the BCE where the step says background, and
    `skip_old_argmax` the background channel too where the old model's argmax there is an old class."""

    step0_family = "bce"
    stream_extras = frozenset({"paste", "pseudo:score", "pseudo:score_quantile"})

    option_keys = (
        "loss.bce_weight",
        "loss.bce_old_background",
        "loss.rskd_weight",
        "loss.rskd_region",
        "model.new_head_init",
    )

    def needs_old_model(self, step: int) -> bool:
        return step > 0 and (self._distils(step) or self.options["loss.bce_old_background"] == "skip_old_argmax")

    def _distils(self, step: int) -> bool:
        return step > 0 and self.options["loss.rskd_weight"] > 0

    def loss_weights(self, step: int) -> dict[str, float]:
        weights = {"bce": float(self.options["loss.bce_weight"])}
        if self._distils(step):
            weights["rskd"] = float(self.options["loss.rskd_weight"])
        return weights

    def loss_terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        shape = inputs.shape
        targets, valid = soft_targets(inputs.label, shape.num_channels, inputs.paste_class, inputs.paste_weight)
        if self.needs_old_model(shape.step) and inputs.old_logits is None:
            raise ValueError(f"method {self.name!r} reads the old model at step {shape.step} but got no old logits")
        skipped = None
        rule = self.options["loss.bce_old_background"]
        if shape.step > 0 and rule in ("skip", "skip_old_argmax"):
            old_logits = inputs.old_logits if rule == "skip_old_argmax" else None
            skipped = unknown_background(
                inputs.label, shape.old_num_channels, shape.num_channels, inputs.paste_weight, old_logits
            )
        terms = {"bce": bce_loss(inputs.logits, targets, valid, skipped)}
        if self._distils(shape.step):
            region = region_mask(inputs.label, inputs.shape.current_channels, self.options["loss.rskd_region"])
            terms["rskd"] = rskd_loss(inputs.logits, inputs.old_logits, region)
        return terms

    def init_new_head(self, model: IncrementalDeepLabV3, num_classes: int) -> None:
        model.add_step_head(num_classes, init=self.options["model.new_head_init"])
