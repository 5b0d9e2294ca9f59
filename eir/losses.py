"""Training losses of EIR (METHOD.md §3.4) and the soft targets they read.

Targets travel through the data pipeline compactly: a uint8 label map (step-t labels with
pseudo-labels merged in, 255 = ignore), a uint8 paste-class map and a per-pixel blend
weight λ. `soft_targets` expands them to dense one-hot targets on the trainer's device, so
no B x C x H x W float tensor is ever serialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eir.labels import IGNORE_LABEL, NO_PASTE

RSKD_REGIONS = ("new_gt", "all", "complement")


def soft_targets(
    label: torch.Tensor,
    num_channels: int,
    paste_class: torch.Tensor | None = None,
    paste_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense soft targets (B x C x H x W float32) and the valid-pixel mask (B x H x W bool).

    Without pasting the target is the one-hot of `label`; 255 pixels get an all-zero row and
    are invalid. With `paste_class` (uint8, `NO_PASTE` = 255 where nothing was pasted) and
    `paste_weight` (λ in [0, 1] per pixel) a pasted pixel becomes
    λ·onehot(paste class) + (1 − λ)·onehot(label) (METHOD.md §3.3 step 5). A pasted pixel
    whose label was 255 becomes λ·onehot(paste class) and counts as valid when λ > 0 —
    "valid" means "has a non-zero target", the set BCE averages over.
    """
    if label.dim() != 3:
        raise ValueError(f"label must be B x H x W, got shape {tuple(label.shape)}")
    if (paste_class is None) != (paste_weight is None):
        raise ValueError("paste_class and paste_weight must be given together (or neither)")
    label = label.long()
    valid = label != IGNORE_LABEL
    _check_classes(label[valid], num_channels, "label")
    batch, height, width = label.shape
    targets = torch.zeros((batch, num_channels, height, width), device=label.device)
    own = valid.float()
    if paste_class is not None and paste_weight is not None:
        for name, tensor in (("paste_class", paste_class), ("paste_weight", paste_weight)):
            if tensor.shape != label.shape:
                raise ValueError(f"{name} shape {tuple(tensor.shape)} differs from label shape {tuple(label.shape)}")
        paste_class = paste_class.to(label.device).long()
        pasted = paste_class != NO_PASTE
        weight = torch.where(pasted, paste_weight.to(label.device).float(), 0.0)
        _check_classes(paste_class[pasted], num_channels, "paste_class")
        if bool(((weight < 0) | (weight > 1)).any()):
            raise ValueError("paste_weight must lie in [0, 1] on pasted pixels")
        own = own * (1.0 - weight)
        targets.scatter_add_(1, torch.where(pasted, paste_class, 0).unsqueeze(1), weight.unsqueeze(1))
        valid = valid | (weight > 0)
    targets.scatter_add_(1, torch.where(label != IGNORE_LABEL, label, 0).unsqueeze(1), own.unsqueeze(1))
    return targets, valid


def _check_classes(values: torch.Tensor, num_channels: int, name: str) -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_channels):
        bad = values[(values < 0) | (values >= num_channels)]
        raise ValueError(
            f"{name} holds class {int(bad[0])}, outside the model's channels 0..{num_channels - 1} (or {IGNORE_LABEL})"
        )


def bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, skipped: torch.Tensor | None = None
) -> torch.Tensor:
    """Sigmoid multi-label BCE over every channel including background (METHOD.md §3.4).

    Per pixel the channel losses are summed; the result is the mean over valid pixels. With
    no valid pixel the loss is 0 and still carries a gradient (zeros), so a batch of pure
    ignore pixels does not break backward or DDP's gradient sync. `skipped` (bool, broadcastable
    to B x C x H x W) drops single channel terms from the sum (`unknown_background`) without
    changing which pixels the mean is over.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    if valid.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"valid mask {tuple(valid.shape)} must be B x H x W of logits {tuple(logits.shape)}")
    per_channel = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    if skipped is not None:
        per_channel = per_channel.masked_fill(skipped, 0.0)
    per_pixel = per_channel.sum(1)
    mask = valid.float()
    return (per_pixel * mask).sum() / mask.sum().clamp(min=1.0)


def unknown_background(
    label: torch.Tensor,
    old_num_channels: int,
    num_channels: int,
    paste_weight: torch.Tensor | None = None,
    old_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The BCE terms `loss.bce_old_background=skip` drops (bool B x C x H x W): the old foreground channels
    1..C_old−1 on pixels the step calls background (label 0: no ground truth, pseudo-label or paste names them).

    At step t such a pixel may hold an old object the pseudo-labels missed, so "not this old class" is not
    known there; the background channel and the new channels keep their terms, and a pasted pixel (λ > 0)
    keeps every term (its pasted class's target is known). MiB's unbiased view of the background, for a
    sigmoid loss: there only the distillation speaks for the old classes.

    With `old_logits` (B x C_old x H x W; `skip_old_argmax`) the background channel's term is dropped too on
    those of the pixels where the old model's argmax is an old foreground class: an old object it saw but did not
    score above the pseudo-label threshold. "Background" is no more known there than "not this old class", and
    pushing channel 0 up on them is what teaches the new model to cover such objects with background (CamVid's
    pavement: pseudo-label recall 44 % at 5-3's step 1, BENCHMARKS.md).
    """
    unknown = label == 0
    if paste_weight is not None:
        unknown = unknown & (paste_weight.to(label.device) == 0)
    old = torch.zeros(num_channels, dtype=torch.bool, device=label.device)
    old[1:old_num_channels] = True
    skipped = unknown.unsqueeze(1) & old.view(1, -1, 1, 1)
    if old_logits is not None:
        if old_logits.shape[1] != old_num_channels or old_logits.shape[-2:] != label.shape[-2:]:
            raise ValueError(
                f"old logits {tuple(old_logits.shape)} must have the {old_num_channels} old channels at the "
                f"label's size {tuple(label.shape[-2:])}"
            )
        seen_old = unknown & (old_logits.argmax(dim=1) > 0)
        skipped[:, 0] |= seen_old
    return skipped


def rskd_loss(
    new_logits: torch.Tensor, old_logits: torch.Tensor, region_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Region-specific unbiased distillation (MiB's UnKD, METHOD.md §3.4).

    q = softmax of the old model's logits over its C_old channels. The new model's
    log-probabilities are regrouped onto the old label space: an old foreground class c
    keeps z_c − logsumexp(z); background collects {0} ∪ new classes (channels
    C_old..C_new−1): logsumexp(z_0, z_new) − logsumexp(z). That group always holds channel
    0, so it is never empty (the released code's one-class-step NaN cannot occur).
    Per pixel: −(1/C_old)·Σ_c q_c·log p_c, times `region_mask` (1 where distillation
    applies; None = everywhere). Normalisation: the mean over *all* B·H·W pixels, masked
    pixels counting as 0 — as in the released code — so the loss scales with the region's
    share of the batch.
    """
    if new_logits.dim() != 4 or old_logits.dim() != 4:
        raise ValueError("rskd_loss expects B x C x H x W logits")
    old_channels, new_channels = old_logits.shape[1], new_logits.shape[1]
    if (
        new_channels < old_channels
        or new_logits.shape[2:] != old_logits.shape[2:]
        or (new_logits.shape[0] != old_logits.shape[0])
    ):
        raise ValueError(
            f"new logits {tuple(new_logits.shape)} must cover the old logits {tuple(old_logits.shape)}: "
            "same batch and size, at least as many channels"
        )
    new = new_logits.float()
    log_total = torch.logsumexp(new, dim=1)
    background_group = torch.cat([new[:, :1], new[:, old_channels:]], dim=1)
    log_p_background = torch.logsumexp(background_group, dim=1) - log_total
    log_p_old = new[:, 1:old_channels] - log_total.unsqueeze(1)
    q = torch.softmax(old_logits.detach().float(), dim=1)
    per_pixel = -(q[:, 0] * log_p_background + (q[:, 1:] * log_p_old).sum(1)) / old_channels
    if region_mask is not None:
        if region_mask.shape != per_pixel.shape:
            raise ValueError(f"region mask {tuple(region_mask.shape)} must be B x H x W {tuple(per_pixel.shape)}")
        per_pixel = per_pixel * region_mask.float()
    return per_pixel.mean()


def region_mask(label: torch.Tensor, new_classes: Sequence[int] | torch.Tensor, mode: str) -> torch.Tensor:
    """Where RSKD applies (float B x H x W, 1 = distil), from the step's ground-truth labels.

    `label` is the step-t label map before pasting (new classes keep their ids there, so it
    marks the original ground truth of the new classes). Modes: "new_gt" = pixels of a new
    class (the default, METHOD.md §3.4); "all" = every pixel; "complement" = every other pixel,
    ignore (255) pixels included.
    """
    if mode not in RSKD_REGIONS:
        raise ValueError(f"unknown RSKD region {mode!r}; expected one of {', '.join(RSKD_REGIONS)}")
    if mode == "all":
        return torch.ones(label.shape, device=label.device)
    classes = torch.as_tensor(new_classes, dtype=torch.long, device=label.device)
    is_new = torch.isin(label.long(), classes)
    return (~is_new if mode == "complement" else is_new).float()


def unbiased_cross_entropy_map(
    logits: torch.Tensor, label: torch.Tensor, background_channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel softmax cross-entropy with MiB's background (B x H x W), and the valid-pixel mask.

    The background of step t is everything the current labels do not name, so a pixel labelled 0 scores
    log Σ_{c < background_channels} p_c: background *or* any old class (MiB's unbiased cross-entropy,
    `background_channels` = the step t−1 model's channels). As in fcdl94/MiB's `UnbiasedCrossEntropy`, a
    label below `background_channels` (an old class) counts as background too; a label of C_t scores
    log p_c; 255 is ignored (loss 0, not valid). `background_channels=1` is the plain softmax cross-entropy
    (step 0, and PLOP, whose background pixels carry old-class pseudo-labels).
    """
    if logits.dim() != 4 or label.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"logits must be B x C x H x W and label B x H x W, got {tuple(logits.shape)}, {tuple(label.shape)}"
        )
    channels = logits.shape[1]
    if not 1 <= background_channels <= channels:
        raise ValueError(f"background_channels must lie in 1..{channels}, got {background_channels}")
    label = label.long()
    valid = label != IGNORE_LABEL
    _check_classes(label[valid], channels, "label")
    logits = logits.float()
    log_total = torch.logsumexp(logits, dim=1)
    log_background = torch.logsumexp(logits[:, :background_channels], dim=1)
    own = torch.gather(logits, 1, torch.where(valid, label, 0).unsqueeze(1)).squeeze(1)
    log_p = torch.where(label < background_channels, log_background, own) - log_total
    return torch.where(valid, -log_p, 0.0), valid


def unbiased_cross_entropy(logits: torch.Tensor, label: torch.Tensor, background_channels: int) -> torch.Tensor:
    """`unbiased_cross_entropy_map` averaged over *all* B·H·W pixels, 255 counting 0 — fcdl94/MiB's reduction
    (`reduction='none'`, then `loss.mean()` in its `train.py`); a pure-255 batch gives 0 with a zero gradient."""
    per_pixel, _ = unbiased_cross_entropy_map(logits, label, background_channels)
    return per_pixel.mean()
