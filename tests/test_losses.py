from __future__ import annotations

import math

import pytest
import torch

from eir.labels import NO_PASTE
from eir.losses import bce_loss, region_mask, rskd_loss, soft_targets, unknown_background

LN = math.log


def test_soft_targets_one_hot_and_ignore():
    label = torch.tensor([[[0, 1], [255, 2]]], dtype=torch.uint8)
    targets, valid = soft_targets(label, 3)
    assert targets.shape == (1, 3, 2, 2) and targets.dtype == torch.float32
    assert targets[0, :, 0, 0].tolist() == [1, 0, 0]
    assert targets[0, :, 0, 1].tolist() == [0, 1, 0]
    assert targets[0, :, 1, 0].tolist() == [0, 0, 0]
    assert targets[0, :, 1, 1].tolist() == [0, 0, 1]
    assert valid.tolist() == [[[True, True], [False, True]]]


def test_soft_targets_blend_pasted_instances():
    label = torch.tensor([[[0, 1], [255, 255]]], dtype=torch.uint8)
    paste_class = torch.tensor([[[2, NO_PASTE], [1, NO_PASTE]]], dtype=torch.uint8)
    paste_weight = torch.tensor([[[0.25, 0.9], [0.5, 0.0]]], dtype=torch.float16)
    targets, valid = soft_targets(label, 3, paste_class, paste_weight)
    assert targets[0, :, 0, 0].tolist() == [0.75, 0, 0.25]  # λ·e2 + (1-λ)·e0
    assert targets[0, :, 0, 1].tolist() == [0, 1, 0]  # not pasted: weight ignored
    assert targets[0, :, 1, 0].tolist() == [0, 0.5, 0]  # ignore pixel pasted: λ·e1, now valid
    assert targets[0, :, 1, 1].tolist() == [0, 0, 0]
    assert valid.tolist() == [[[True, True], [True, False]]]


def test_soft_targets_hard_paste_replaces_label():
    label = torch.tensor([[[1]]])
    targets, _ = soft_targets(label, 3, torch.tensor([[[2]]]), torch.tensor([[[1.0]]]))
    assert targets[0, :, 0, 0].tolist() == [0, 0, 1]


def test_soft_targets_errors():
    with pytest.raises(ValueError, match="label holds class 3, outside the model's channels 0..2"):
        soft_targets(torch.tensor([[[3]]]), 3)
    with pytest.raises(ValueError, match="together"):
        soft_targets(torch.tensor([[[1]]]), 3, paste_class=torch.tensor([[[1]]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soft_targets(torch.tensor([[[1]]]), 3, torch.tensor([[[2]]]), torch.tensor([[[1.5]]]))


def test_bce_by_hand():
    # pixel 0: label 0, logits (0, 2); pixel 1 is ignored.
    logits = torch.tensor([[0.0, 5.0], [2.0, -5.0]]).reshape(1, 2, 1, 2).requires_grad_()
    targets, valid = soft_targets(torch.tensor([[[0, 255]]]), 2)
    loss = bce_loss(logits, targets, valid)
    assert loss.item() == pytest.approx(LN(2) + LN(1 + math.e**2))
    loss.backward()
    assert logits.grad[0, :, 0, 1].abs().sum() == 0  # the ignored pixel gets no gradient


def test_bce_soft_target_by_hand():
    # BCE(x, y) = log(1 + e^x) - y·x; x = 1, y = 0.25 on one channel, x = 0, y = 0.75 on the other.
    logits = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    targets = torch.tensor([0.75, 0.25]).reshape(1, 2, 1, 1)
    loss = bce_loss(logits, targets, torch.ones(1, 1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(LN(2) + LN(1 + math.e) - 0.25)


def test_bce_without_valid_pixels_is_zero_with_grad():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets, valid = soft_targets(torch.full((2, 4, 4), 255), 3)
    loss = bce_loss(logits, targets, valid)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_unknown_background_skips_old_channels_where_the_step_says_background_by_hand():
    """Step 1 of a 1+2 / 2 model (channels 0 | 1, 2 old | 3, 4 new). Pixels: background, new class 3, old class 1
    (a pseudo-label), ignore, and background with a pasted instance (λ = 0.4). Only the old channels 1 and 2 of
    the first pixel are skipped; the mean stays over the four valid pixels."""
    label = torch.tensor([[[0, 3, 1, 255, 0]]])
    paste_class = torch.tensor([[[NO_PASTE, NO_PASTE, NO_PASTE, NO_PASTE, 2]]], dtype=torch.uint8)
    paste_weight = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.4]]])
    skipped = unknown_background(label, old_num_channels=3, num_channels=5, paste_weight=paste_weight)
    assert skipped.shape == (1, 5, 1, 5)
    assert skipped[0, :, 0].nonzero().tolist() == [[1, 0], [2, 0]]
    logits = torch.linspace(-2.0, 2.0, 25).reshape(1, 5, 1, 5).requires_grad_()
    targets, valid = soft_targets(label, 5, paste_class, paste_weight)
    loss = bce_loss(logits, targets, valid, skipped)
    x, y = logits.detach()[0, :, 0], targets[0, :, 0]
    terms = torch.log1p(torch.exp(x)) - y * x  # BCE(x, y) per channel and pixel, written out
    terms[1:3, 0] = 0.0
    assert loss.item() == pytest.approx((terms[:, [0, 1, 2, 4]].sum() / 4).item(), abs=1e-6)
    loss.backward()
    assert logits.grad[0, 1:3, 0, 0].abs().sum() == 0  # no gradient to the old channels on unknown background
    assert (logits.grad[0, [0, 3, 4], 0, 0] != 0).all() and (logits.grad[0, 1:3, 0, [1, 2, 4]] != 0).all()
    # without a paste map every background pixel counts as unknown
    assert unknown_background(label, 3, 5)[0, 1:3, 0].tolist() == [[True, False, False, False, True]] * 2


def test_skip_old_argmax_also_skips_background_where_the_old_model_sees_an_old_class_by_hand():
    """The same step, one more pixel (background the old model calls background). Old model 1+2 channels: its
    argmax is old class 2 on pixel 0 (unknown background: channel 0 skipped too), old class 1 on pixel 2 (a
    pseudo-label: every term kept) and on the pasted pixel 4 (every term kept), background on pixel 5 (only the
    old channels skipped, as under `skip`)."""
    label = torch.tensor([[[0, 3, 1, 255, 0, 0]]])
    paste_weight = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.4, 0.0]]])
    old_logits = torch.tensor(
        [[[[0.1, 2.0, -1.0, 0.0, -3.0, 1.5]], [[-2.0, -1.0, 0.5, 0.0, 1.0, -0.5]], [[0.3, 1.0, -2.0, 0.0, 0.0, 1.4]]]]
    )
    skipped = unknown_background(label, 3, 5, paste_weight, old_logits)
    plain = unknown_background(label, 3, 5, paste_weight)
    assert skipped[0, :, 0].nonzero().tolist() == [[0, 0], [1, 0], [1, 5], [2, 0], [2, 5]]
    assert torch.equal(skipped[:, 1:], plain[:, 1:]) and not plain[:, 0].any()
    with pytest.raises(ValueError, match=r"old logits \(1, 2, 1, 6\) must have the 3 old channels"):
        unknown_background(label, 3, 5, paste_weight, old_logits[:, :2])


def test_rskd_two_by_two_by_hand():
    # Old model: background + class 1. New model adds class 2 (channel 2).
    old = torch.tensor(
        [
            [[0.0, LN(3)], [0.0, 10.0]],  # old background logits per pixel (a, b / c, d)
            [[0.0, 0.0], [LN(3), -10.0]],  # old class 1
        ]
    ).unsqueeze(0)
    new = torch.tensor(
        [
            [[0.0, 0.0], [LN(3), 1.0]],
            [[0.0, LN(2)], [0.0, 2.0]],
            [[0.0, LN(2)], [0.0, 3.0]],
        ]
    ).unsqueeze(0)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    # a: q = (1/2, 1/2); p_bg = 2/3, p_1 = 1/3
    loss_a = -(0.5 * LN(2 / 3) + 0.5 * LN(1 / 3)) / 2
    # b: q = (3/4, 1/4); logsumexp = ln 5; p_bg = (1 + 2) / 5, p_1 = 2 / 5
    loss_b = -(0.75 * LN(3 / 5) + 0.25 * LN(2 / 5)) / 2
    # c: q = (1/4, 3/4); logsumexp = ln 5; p_bg = (3 + 1) / 5, p_1 = 1 / 5
    loss_c = -(0.25 * LN(4 / 5) + 0.75 * LN(1 / 5)) / 2
    expected = (loss_a + loss_b + loss_c + 0.0) / 4  # d is masked out but still counted
    assert rskd_loss(new, old, mask).item() == pytest.approx(expected, rel=1e-6)


def test_rskd_new_class_evidence_counts_as_background():
    # The old model saw background; the new model is sure of the new class: no penalty.
    old = torch.tensor([30.0, 0.0]).reshape(1, 2, 1, 1)
    new = torch.tensor([0.0, 0.0, 30.0]).reshape(1, 3, 1, 1)
    assert rskd_loss(new, old, None).item() == pytest.approx(0.0, abs=1e-6)


def test_rskd_one_class_step_is_finite():
    torch.manual_seed(0)
    old = torch.randn(2, 16, 5, 5) * 50
    new = (torch.randn(2, 17, 5, 5) * 50).requires_grad_()
    loss = rskd_loss(new, old, torch.ones(2, 5, 5))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(new.grad).all()


def test_rskd_mask_and_shapes():
    old, new = torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2)
    assert rskd_loss(new, old, torch.zeros(1, 2, 2)).item() == 0.0
    with pytest.raises(ValueError, match="at least as many channels"):
        rskd_loss(old, new, None)
    with pytest.raises(ValueError, match="region mask"):
        rskd_loss(new, old, torch.ones(2, 2))


def test_region_mask_modes():
    label = torch.tensor([[[0, 16], [255, 17]]], dtype=torch.uint8)
    assert region_mask(label, [16, 17], "new_gt").tolist() == [[[0, 1], [0, 1]]]
    assert region_mask(label, [16, 17], "complement").tolist() == [[[1, 0], [1, 0]]]
    assert region_mask(label, torch.tensor([17]), "all").tolist() == [[[1, 1], [1, 1]]]
    with pytest.raises(ValueError, match="new_gt, all, complement"):
        region_mask(label, [16], "old")
