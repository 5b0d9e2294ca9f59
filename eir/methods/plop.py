"""PLOP (Douillard et al., CVPR 2021; arthurdouillard/CVPR2021_PLOP): pseudo-labels, Local POD, adaptive CE.

Read against the authors' `train.py`, `argparser.py` (its `--method PLOP` preset), `segmentation_module.py`
and `scripts/voc/`; METHOD.md §4.1 lists every decision with its reason.

- Softmax heads, MiB's initialisation and argmax prediction (`SoftmaxMethod`; PLOP's `--init_balanced`).
- Step 0 is the plain softmax cross-entropy and nothing else (PLOP adds POD and pseudo-labels at step > 0
  only), so PLOP shares MiB's cached step 0 (family `softmax_ce`).
- Pseudo-labels (`pseudo.rule=median_entropy`, preset): a background pixel takes the old model's argmax
  channel c (0 included) where its normalised entropy is below τ_c, else it is `REJECTED_PSEUDO`
  (`eir.pseudo`; thresholds computed once per step by the Ray Data inference pass).
- Classification loss at t ≥ 1: the plain per-pixel softmax cross-entropy (PLOP's preset does not set
  `--unce`) on the new labels and the accepted pseudo-labels, rejected and void pixels ignored, each
  image's pixels times its classifier adaptive factor (accepted background pixels / background pixels),
  then the mean over all B·H·W pixels, ignored ones counting 0 (PLOP's `loss.mean()` over a
  `reduction='none'` loss). An image without a background pixel keeps factor 1 (PLOP's code gives it
  0 / (0 + 1e-6) = 0; its comment says the factor is 1 when no background pixel is uncertain).
- Local POD (`features_distillation(..., collapse_channels="local")`) on the four backbone stages, the
  decoder output and the heads' logits before upsampling (its `--pod_logits`, new channels' logits summed
  into background: its `extra_channels: sum`): activations squared (`prepro="pow"`); for each scale s of
  1, 2, 4 (`--spp_scales`) the map is cut into s x s regions, each mean-pooled over its width and over its
  height; no normalisation; L2 distance between old and new embeddings per image, averaged over the batch;
  each map's distance times its factor (`loss.pod_weight` 0.01 on the features, `loss.pod_logits_weight`
  0.0005 on the logits: PLOP's VOC setting) and sqrt(channels / |C_t|) (its POD schedule, channels
  counting background as its task lists do); the sum divided by the number of maps (6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from eir.labels import IGNORE_LABEL, REJECTED_PSEUDO
from eir.losses import unbiased_cross_entropy, unbiased_cross_entropy_map
from eir.methods.base import LossInputs, StepShape, frozen
from eir.methods.bce_distillation import NO_EXTRAS
from eir.methods.mib import SoftmaxMethod

POD_FEATURES = ("stage1", "stage2", "stage3", "stage4", "decoder")
POD_LOGITS = "head_logits"
POD_SCALES = (1, 2, 4)


def local_pod_embedding(x: torch.Tensor, scales: Sequence[int] = POD_SCALES) -> torch.Tensor:
    """B x C x H x W activations → B x D, PLOP's Local POD embedding.

    The activations are squared; at each scale s the map is cut into s x s regions of H//s x W//s pixels
    (the remainder rows and columns are left out, as PLOP's slicing leaves them); each region gives its
    mean over the width (C x H//s values) and its mean over the height (C x W//s values). PLOP sizes the
    regions by the width alone, which is the same on the square training crops. A scale whose regions
    would be under one pixel is skipped (PLOP's slices would be empty and its means NaN).
    """
    if x.dim() != 4:
        raise ValueError(f"Local POD pools B x C x H x W maps, got shape {tuple(x.shape)}")
    squared = x.float().pow(2)
    height, width = squared.shape[-2:]
    parts = []
    for scale in scales:
        rows, cols = height // scale, width // scale
        if rows == 0 or cols == 0:
            continue
        for i in range(scale):
            for j in range(scale):
                region = squared[..., i * rows : (i + 1) * rows, j * cols : (j + 1) * cols]
                parts += [region.mean(dim=3).flatten(1), region.mean(dim=2).flatten(1)]
    return torch.cat(parts, dim=1)


def local_pod_distance(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The L2 distance between the old and new maps' Local POD embeddings, per image, averaged over the batch."""
    if old.shape != new.shape:
        raise ValueError(f"Local POD compares maps of one shape, got old {tuple(old.shape)} and new {tuple(new.shape)}")
    return (local_pod_embedding(new) - local_pod_embedding(old.detach())).norm(dim=1).mean()


def logits_in_old_channels(logits: torch.Tensor, old_channels: int) -> torch.Tensor:
    """The new model's logits on the old model's channels: the new channels' logits added to background's."""
    background = logits[:, :1] + logits[:, old_channels:].sum(dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:old_channels]], dim=1)


def classifier_adaptive_factor(label: torch.Tensor, old_channels: int) -> torch.Tensor:
    """Per image (B,): accepted background pixels / background pixels, 1 where an image has no background pixel.

    `label` is the merged training label: an accepted background pixel holds a channel below
    `old_channels` (0 or an old class), a rejected one `REJECTED_PSEUDO`.
    """
    label = label.long()
    accepted = (label < old_channels).sum(dim=(1, 2))
    background = accepted + (label == REJECTED_PSEUDO).sum(dim=(1, 2))
    return torch.where(background > 0, accepted / background.clamp(min=1), torch.ones_like(accepted, dtype=torch.float))


def adaptive_cross_entropy(logits: torch.Tensor, label: torch.Tensor, old_channels: int) -> torch.Tensor:
    """PLOP's classification loss at t ≥ 1: softmax CE per pixel (rejected and void pixels 0) times its image's
    classifier adaptive factor, averaged over all B·H·W pixels."""
    label = label.long()
    per_pixel, _ = unbiased_cross_entropy_map(logits, torch.where(label == REJECTED_PSEUDO, IGNORE_LABEL, label), 1)
    factor = classifier_adaptive_factor(label, old_channels).to(per_pixel.device)
    return (per_pixel * factor[:, None, None]).mean()


def pod_schedule(shape: StepShape) -> float:
    """PLOP's POD schedule: sqrt(channels of the step / channels it adds), background counted."""
    return math.sqrt(shape.num_channels / shape.head_sizes[-1])


class Plop(SoftmaxMethod):
    name = "plop"
    presets = frozen({**NO_EXTRAS, "pseudo.enabled": True, "pseudo.rule": "median_entropy"})
    option_keys = ("loss.pod_weight", "loss.pod_logits_weight")
    features = (*POD_FEATURES, POD_LOGITS)
    stream_extras = frozenset({"pseudo:median_entropy"})

    def _distils(self, step: int) -> dict[str, float]:
        """The POD terms that run at `step`, with their factors."""
        if step == 0:
            return {}
        factors = {"pod": self.options["loss.pod_weight"], "pod_logits": self.options["loss.pod_logits_weight"]}
        return {name: float(factor) for name, factor in factors.items() if factor > 0}

    def needs_old_model(self, step: int) -> bool:
        return bool(self._distils(step))

    def loss_weights(self, step: int) -> dict[str, float]:
        return {"ce": 1.0, **self._distils(step)}

    def loss_terms(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        shape = inputs.shape
        if shape.step == 0:  # the step 0 of the softmax_ce family, the same as MiB's
            return {"ce": unbiased_cross_entropy(inputs.logits, inputs.label, 1)}
        terms = {"ce": adaptive_cross_entropy(inputs.logits, inputs.label, shape.old_num_channels)}
        distils = self._distils(shape.step)
        if not distils:
            return terms
        missing = [name for name in self.features if name not in inputs.features or name not in inputs.old_features]
        if missing:
            raise ValueError(
                f"method {self.name!r} distils {missing} at step {shape.step} but the model outputs lack them"
            )
        maps = len(POD_FEATURES) + ("pod_logits" in distils)
        schedule = pod_schedule(shape) / maps
        if "pod" in distils:
            distances = [local_pod_distance(inputs.old_features[n], inputs.features[n]) for n in POD_FEATURES]
            terms["pod"] = schedule * torch.stack(distances).sum()
        if "pod_logits" in distils:
            new = logits_in_old_channels(inputs.features[POD_LOGITS], shape.old_num_channels)
            terms["pod_logits"] = schedule * local_pod_distance(inputs.old_features[POD_LOGITS], new)
        return terms
