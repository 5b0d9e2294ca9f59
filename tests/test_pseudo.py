"""The pseudo-label rules on hand-made logit maps (EIR's score threshold, PLOP's per-class median entropy with its
histogram, medians and floor), and the quality reduction on a hand-made matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eir.labels import REJECTED_PSEUDO
from eir.pseudo import (
    SCORE_BINS,
    EntropyThresholds,
    PseudoRule,
    ScoreThresholds,
    entropy_histogram,
    entropy_pseudo_labels,
    histogram_medians,
    histogram_quantiles,
    merge_pseudo,
    normalised_entropy,
    plop_entropy_floor,
    pseudo_label_quality,
    pseudo_labels,
    quantile_pseudo_labels,
    score_histogram,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_threshold_rule_on_background_pixels_only() -> None:
    # 3 old channels (bg, 1, 2) on a 1x2x2 image.
    probs = torch.tensor(
        [
            [[0.9, 0.9], [0.9, 0.9]],  # background channel: never consulted
            [[0.80, 0.60], [0.75, 0.95]],  # class 1
            [[0.10, 0.65], [0.72, 0.20]],  # class 2
        ]
    )
    logits = torch.logit(probs)[None]
    label = torch.tensor([[[0, 0], [0, 3]]])  # the last pixel is a new class (channel 3): keep GT
    out = pseudo_labels(logits, label, threshold=0.7)
    # (0,0): best 0.80 class 1 >= 0.7 → 1; (0,1): best 0.65 < 0.7 → 0; (1,0): class 1 0.75 wins over 0.72 → 1;
    # (1,1): labelled 3, not background → 0.
    assert out.dtype == torch.uint8
    assert out[0].tolist() == [[1, 0], [1, 0]]


def test_exactly_at_threshold_counts() -> None:
    logits = torch.tensor([[[[0.0]], [[logit(0.7)]]]])
    assert pseudo_labels(logits, torch.zeros(1, 1, 1, dtype=torch.long))[0, 0, 0] == 1


def test_ignore_pixels_get_no_pseudo_label() -> None:
    logits = torch.tensor([[[[0.0]], [[5.0]]]])
    assert pseudo_labels(logits, torch.full((1, 1, 1), 255))[0, 0, 0] == 0


def test_merge_fills_background_only() -> None:
    label = np.array([[0, 4, 255], [0, 0, 4]], dtype=np.uint8)
    pseudo = np.array([[2, 0, 0], [0, 1, 0]], dtype=np.uint8)
    assert merge_pseudo(label, pseudo).tolist() == [[2, 4, 255], [0, 1, 4]]
    merged = merge_pseudo(torch.from_numpy(label), torch.from_numpy(pseudo))
    assert merged.dtype == torch.uint8 and merged.tolist() == [[2, 4, 255], [0, 1, 4]]


def test_bad_threshold_and_shapes() -> None:
    with pytest.raises(ValueError, match="threshold"):
        pseudo_labels(torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1), threshold=1.5)
    with pytest.raises(ValueError, match="shapes"):
        pseudo_labels(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1))


def test_quality_counts_recall_over_truth_and_precision_over_claims() -> None:
    # rows = complete ground truth, columns = pseudo-label (0 = none); channels 1, 2 old, 3 new.
    confusion = np.array(
        [
            [50, 5, 0, 0],  # background: 5 pixels wrongly claimed as channel 1
            [10, 30, 0, 0],  # channel 1: 30 of 40 recovered
            [20, 0, 0, 0],  # channel 2: none recovered, none claimed
            [7, 0, 0, 0],  # a new-class pixel is never an old pixel to recover
        ]
    )
    quality = pseudo_label_quality(confusion, old_channels=[1, 2])
    assert quality["recall_old"] == pytest.approx(100 * 30 / 60)
    assert quality["precision_old"] == pytest.approx(100 * 30 / 35)
    assert quality["per_channel"][1] == {
        "recall": pytest.approx(75.0),
        "precision": pytest.approx(100 * 30 / 35),
        "as_other_old": 0.0,
        "mostly_as": None,
        "mostly_as_share": None,
        "pixels": 40,
    }
    assert quality["per_channel"][2] == {
        "recall": 0.0,
        "precision": None,
        "as_other_old": 0.0,
        "mostly_as": None,
        "mostly_as_share": None,
        "pixels": 20,
    }
    assert quality["as_other_old"] == 0.0


def test_quality_counts_old_pixels_taught_as_another_old_class() -> None:
    # channel 1 (60 pixels): 30 right, 12 as channel 3, 6 as channel 2, 12 to none; channel 4 is new.
    confusion = np.zeros((5, 5), dtype=np.int64)
    confusion[1, [0, 1, 2, 3]] = [12, 30, 6, 12]
    confusion[2, [0, 2]] = [5, 15]
    confusion[3, [1, 3]] = [4, 16]
    confusion[4, 1] = 9  # a new-class pixel claimed as old: a precision loss, not an old class crossed
    quality = pseudo_label_quality(confusion, old_channels=[1, 2, 3])
    first, second, third = (quality["per_channel"][c] for c in (1, 2, 3))
    assert (first["as_other_old"], first["mostly_as"]) == (pytest.approx(100 * 18 / 60), 3)
    assert first["mostly_as_share"] == pytest.approx(100 * 12 / 60), "channel 3's 12, not all 18 crossed pixels"
    assert (second["as_other_old"], second["mostly_as"]) == (0.0, None)
    assert (third["as_other_old"], third["mostly_as"]) == (pytest.approx(100 * 4 / 20), 1)
    assert quality["as_other_old"] == pytest.approx(100 * 22 / 100)
    assert first["precision"] == pytest.approx(100 * 30 / 43)


def test_quality_with_nothing_to_recover_is_none_not_zero() -> None:
    quality = pseudo_label_quality(np.array([[9, 0], [0, 0]]), old_channels=[1])
    assert quality["recall_old"] is None and quality["precision_old"] is None


# ---------------------------------------------------------------- PLOP's rule (pseudo.rule=median_entropy)


def entropy_by_hand(probabilities: list[float]) -> float:
    """-Σ p ln p / ln C, in plain Python."""
    return -sum(p * math.log(p) for p in probabilities if p > 0) / math.log(len(probabilities))


def logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    """1 x C x 1 x N logits whose softmax at pixel n is probabilities[n]."""
    return torch.tensor(probabilities).log().T[None, :, None, :]


def test_normalised_entropy_by_hand() -> None:
    pixels = [[1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1], [0.98, 0.01, 0.01]]
    got = normalised_entropy(logits_of(pixels))[0, 0].tolist()
    assert got == pytest.approx([entropy_by_hand(p) for p in pixels], abs=1e-6)
    assert got[0] == pytest.approx(1.0) and 0 < got[2] < got[1] < 1


def test_entropy_histogram_counts_background_pixels_by_argmax_and_bin() -> None:
    # Four pixels of a 3-channel old model: (argmax, normalised entropy) by hand.
    pixels = [[0.98, 0.01, 0.01], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.05, 0.9, 0.05]]
    label = torch.tensor([[[0, 0, 0, 7]]])  # the last pixel is a new class: not background, not counted
    histogram = entropy_histogram(logits_of(pixels), label, bins=10)
    expected = np.zeros((3, 10), dtype=np.int64)
    for winner, probabilities in zip((0, 1, 2), pixels[:3]):
        expected[winner, int(entropy_by_hand(probabilities) * 10)] += 1
    assert histogram.dtype == np.int64 and (histogram == expected).all()
    # Histograms of batches add up to the histogram of the whole.
    both = entropy_histogram(logits_of(pixels[:2]), label[..., :2], 10) + entropy_histogram(
        logits_of(pixels[2:]), label[..., 2:], 10
    )
    assert (both == histogram).all()


def test_histogram_medians_interpolate_inside_the_median_bin() -> None:
    histogram = np.array([[2, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0], [0, 0, 0, 5]])
    medians = histogram_medians(histogram)
    # Row 0: half (2) reached at the end of bin 0 → 0.25. Row 1: 1 pixel below bin 2, the median is 1/3 of the way
    # into bin 2 ([0.5, 0.75)) → 0.5 + 0.25 / 3. Row 2: no pixel. Row 3: half-way into the last bin.
    assert medians[0] == pytest.approx(0.25)
    assert medians[1] == pytest.approx(0.5 + 0.25 / 3)
    assert math.isnan(medians[2])
    assert medians[3] == pytest.approx(0.875)


def test_histogram_median_matches_the_exact_median_of_the_samples() -> None:
    samples = np.random.default_rng(0).beta(0.5, 4.0, size=20_000)  # a skewed, confident-model-like spread
    histogram = np.histogram(samples, bins=1000, range=(0, 1))[0][None]
    assert histogram_medians(histogram)[0] == pytest.approx(np.median(samples), abs=1e-3)


def test_thresholds_are_the_medians_raised_to_the_floor() -> None:
    histogram = np.array([[2, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    thresholds = EntropyThresholds.from_histogram(histogram, floor=0.3)
    assert thresholds.thresholds == pytest.approx((0.3, 0.5 + 0.25 / 3, 0.3))  # 0.25 < floor; no pixel → floor
    assert thresholds.pixels == (4, 4, 0) and thresholds.medians[2] is None
    assert EntropyThresholds.from_json(thresholds.to_json()) == thresholds
    assert "1: 0.5833 (4 px)" in thresholds.summary()


def plop_code_entropy(logits: torch.Tensor, num_channels: int) -> torch.Tensor:
    """PLOP's train.py, written out: entropy(p) = -(1 / ln C_old) · mean_c p ln(p + 1e-8), divided by ln C."""
    p = torch.softmax(logits, dim=1)
    per_pixel = -(1 / math.log(p.shape[1] + 1e-8)) * torch.mean(p * torch.log(p + 1e-8), dim=1)
    return per_pixel / math.log(num_channels)


def test_the_floor_in_normalised_entropy_accepts_what_plop_code_accepts() -> None:
    old_channels, channels = 16, 17  # VOC 15-1's first incremental step
    floor = plop_entropy_floor(0.001, old_channels, channels)
    assert floor == pytest.approx(0.001 * 16 * math.log(17))
    logits = torch.randn(2, old_channels, 40, 40, generator=torch.Generator().manual_seed(0)) * 6
    ours = normalised_entropy(logits) < floor
    theirs = plop_code_entropy(logits, channels) < 0.001
    assert 0 < int(ours.sum()) < ours.numel()  # both sides of the floor are exercised
    assert (ours == theirs).float().mean() > 0.999  # PLOP's 1e-8 moves pixels within ~1e-7 of the floor only


def test_entropy_rule_accepts_below_the_class_threshold_and_marks_the_rest_rejected() -> None:
    pixels = [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]
    entropies = [entropy_by_hand(p) for p in pixels]
    label = torch.tensor([[[0, 0, 0, 0, 5]]])  # the last pixel is a new class
    thresholds = [entropies[0] + 0.01, entropies[1] + 0.01, entropies[2] - 0.01]  # class 2 is too uncertain
    out = entropy_pseudo_labels(logits_of(pixels), label, thresholds)
    # accepted background (0), accepted old class 1, rejected (class 2's τ is below its entropy), rejected (class 1
    # but more uncertain than τ_1), not background → 0.
    assert out.dtype == torch.uint8
    assert out[0, 0].tolist() == [0, 1, REJECTED_PSEUDO, REJECTED_PSEUDO, 0]
    merged = merge_pseudo(label[0, 0].numpy().astype(np.uint8), out[0, 0].numpy())
    assert merged.tolist() == [0, 1, REJECTED_PSEUDO, REJECTED_PSEUDO, 5]


def test_entropy_rule_needs_one_threshold_per_old_channel() -> None:
    with pytest.raises(ValueError, match="one threshold per old channel"):
        entropy_pseudo_labels(torch.zeros(1, 3, 1, 1), torch.zeros(1, 1, 1), [0.5, 0.5])
    with pytest.raises(ValueError, match="C >= 2 channels"):
        normalised_entropy(torch.zeros(1, 1, 2, 2))


def test_rule_for_a_step() -> None:
    assert PseudoRule.for_step("score", threshold=0.6, entropy_floor=0.5, old_channels=4, num_channels=6) == (
        PseudoRule("score", threshold=0.6)
    )
    rule = PseudoRule.for_step("median_entropy", threshold=0.6, entropy_floor=0.001, old_channels=6, num_channels=9)
    assert rule.name == "median_entropy" and rule.entropy_floor == pytest.approx(0.006 * math.log(9))
    with pytest.raises(ValueError, match="marks the background pixels it rejects 254, a channel of this step"):
        PseudoRule.for_step("median_entropy", threshold=0.6, entropy_floor=0.001, old_channels=250, num_channels=255)
    with pytest.raises(ValueError, match="unknown pseudo.rule 'best'"):
        PseudoRule.for_step("best", threshold=0.6, entropy_floor=0.001, old_channels=2, num_channels=3)


def test_histogram_quantile_matches_the_exact_quantile_of_the_samples() -> None:
    samples = np.random.default_rng(1).beta(2, 5, 20_000)
    histogram = np.histogram(samples, bins=SCORE_BINS, range=(0, 1))[0][None]
    for q in (0.1, 0.5, 0.9):
        assert histogram_quantiles(histogram, q)[0] == pytest.approx(np.quantile(samples, q), abs=1e-3)
    assert np.isnan(histogram_quantiles(np.zeros((1, 4), np.int64), 0.5)[0])
    with pytest.raises(ValueError, match="quantile"):
        histogram_quantiles(histogram, 1.0)


def _per_pixel_score_reference(logits: torch.Tensor, label: torch.Tensor):
    """Pixel by pixel, in plain Python: (prediction, its sigmoid score) of each background pixel the old model
    predicts as a foreground channel."""
    found = []
    for b in range(logits.shape[0]):
        for y in range(logits.shape[2]):
            for x in range(logits.shape[3]):
                values = logits[b, :, y, x].tolist()
                best = max(range(len(values)), key=lambda c: (values[c], -c))
                if label[b, y, x] == 0 and best > 0:
                    found.append((b, y, x, best, 1 / (1 + math.exp(-values[best]))))
    return found


def test_score_histogram_counts_what_the_old_model_predicts_on_background() -> None:
    torch.manual_seed(0)
    logits, label = torch.randn(2, 4, 5, 6) * 3, torch.randint(0, 3, (2, 5, 6))
    label[0, :2] = 0
    histogram = score_histogram(logits, label, bins=10)
    expected = np.zeros((4, 10), np.int64)
    for _, _, _, channel, score in _per_pixel_score_reference(logits, label):
        expected[channel, min(int(score * 10), 9)] += 1
    assert np.array_equal(histogram, expected) and histogram[0].sum() == 0
    assert np.array_equal(score_histogram(logits, torch.full_like(label, 255)), np.zeros((4, SCORE_BINS), np.int64))


def test_score_thresholds_are_the_quantiles_capped_by_the_global_threshold() -> None:
    histogram = np.zeros((4, 10), np.int64)
    histogram[1, 9] = 10  # channel 1: scores in [0.9, 1): its quantile is above the cap
    histogram[2, 2] = 4  # channel 2: scores in [0.2, 0.3): the median 0.25 sets τ
    found = ScoreThresholds.from_histogram(histogram, quantile=0.5, cap=0.7)
    assert found.thresholds == pytest.approx((0.7, 0.7, 0.2, 0.7))  # the median's bin [0.2, 0.3)
    assert found.quantiles[0] is None and found.quantiles[3] is None and found.pixels == (0, 10, 4, 0)
    with pytest.raises(ValueError, match="cap"):
        ScoreThresholds.from_histogram(histogram, quantile=0.5, cap=1.0)


def test_quantile_pseudo_labels_follow_the_per_class_thresholds() -> None:
    torch.manual_seed(1)
    logits, label = torch.randn(2, 4, 6, 7) * 3, torch.randint(0, 3, (2, 6, 7))
    tau = [0.7, 0.95, 0.3, 0.6]
    chosen = quantile_pseudo_labels(logits, label, tau)
    expected = torch.zeros_like(label, dtype=torch.uint8)
    for b, y, x, channel, score in _per_pixel_score_reference(logits, label):
        if score >= tau[channel]:
            expected[b, y, x] = channel
    assert torch.equal(chosen, expected) and chosen.dtype == torch.uint8
    assert int((chosen > 0).sum()) > 0, "some pixels pass"
    # With every τ at the cap it is the old prediction above the global threshold on background pixels.
    capped = quantile_pseudo_labels(logits, label, [0.7] * 4)
    assert bool(((capped > 0) <= (label == 0)).all())
    with pytest.raises(ValueError, match="one sigmoid threshold"):
        quantile_pseudo_labels(logits, label, [0.7, 0.7])
    all_ignored = quantile_pseudo_labels(logits, torch.full_like(label, 255), tau)
    assert int(all_ignored.sum()) == 0
