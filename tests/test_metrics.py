from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eir.metrics import ConfusionMatrix, confusion_matrix, mean_over_steps, predict, reduce_scores

# A 2x3 batch of three classes with one ignore pixel. (gt, pred) pairs:
# (0,0) (1,2) (2,2) / (2,1) (255,-) (1,1)
TARGET = np.array([[0, 1, 2], [2, 255, 1]], dtype=np.uint8)
PRED = np.array([[0, 2, 2], [1, 0, 1]], dtype=np.int64)
EXPECTED = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=np.int64)


def test_confusion_matrix_numpy_rows_are_ground_truth():
    matrix = confusion_matrix(PRED, TARGET, 3)
    assert isinstance(matrix, np.ndarray) and matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, EXPECTED)


def test_confusion_matrix_tensor_stays_a_tensor():
    matrix = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(TARGET), 3)
    assert isinstance(matrix, torch.Tensor) and matrix.dtype == torch.int64
    np.testing.assert_array_equal(matrix.numpy(), EXPECTED)


def test_confusion_matrix_rejects_out_of_range_and_shape():
    with pytest.raises(ValueError, match="target holds class 3 outside 0..2"):
        confusion_matrix(PRED, np.where(TARGET == 2, 3, TARGET), 3)
    with pytest.raises(ValueError, match="prediction holds class 5"):
        confusion_matrix(np.full_like(PRED, 5), TARGET, 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED[:1], TARGET, 3)


def test_confusion_matrix_accumulates_merges_and_resets():
    cm = ConfusionMatrix(3)
    cm.accumulate(torch.from_numpy(PRED), torch.from_numpy(TARGET))
    cm.accumulate(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, 2 * EXPECTED)
    other = ConfusionMatrix(3)
    other.accumulate(PRED, TARGET)
    cm.merge(other)
    cm.merge(EXPECTED)
    np.testing.assert_array_equal(cm.matrix, 4 * EXPECTED)
    with pytest.raises(ValueError, match="cannot merge a \\(2, 2\\)"):
        cm.merge(np.zeros((2, 2), dtype=np.int64))
    cm.reset()
    assert cm.matrix.sum() == 0


def test_reduce_scores_by_hand():
    scores = reduce_scores(EXPECTED, old_classes=[1], new_classes=[2])
    third = 100 / 3
    assert scores.per_class_iou == pytest.approx({0: 100.0, 1: third, 2: third})
    assert scores.mIoU_old == pytest.approx((100 + third) / 2)
    assert scores.mIoU_new == pytest.approx(third)
    assert scores.mIoU_all == pytest.approx((100 + 2 * third) / 3)
    assert scores.hIoU == pytest.approx(2 * (200 / 3) * third / (200 / 3 + third))  # 44.44
    assert scores.mIoU_all_fg == pytest.approx(third)
    assert scores.mIoU_old_fg == pytest.approx(third)
    assert scores.pixel_accuracy == pytest.approx(60.0)


def test_reduce_scores_step0_has_no_new_group():
    scores = reduce_scores(EXPECTED, old_classes=[1, 2], new_classes=[])
    assert scores.mIoU_new is None and scores.hIoU is None
    assert scores.mIoU_old == pytest.approx(scores.mIoU_all)
    assert "mIoU_new" not in scores.to_dict() and "IoU_2" in scores.to_dict()


def test_class_without_ground_truth():
    # Class 3 never appears: NaN, left out of the means. Class 4 has no ground truth but is
    # predicted once: IoU 0, counted.
    matrix = np.zeros((5, 5), dtype=np.int64)
    matrix[:3, :3] = EXPECTED
    matrix[0, 4] = 1  # a background pixel predicted as 4
    scores = reduce_scores(matrix, old_classes=[1, 2], new_classes=[3, 4])
    assert math.isnan(scores.per_class_iou[3])
    assert scores.per_class_iou[4] == 0.0
    assert scores.per_class_iou[0] == pytest.approx(50.0)  # 1 / (1 + 2 - 1)
    assert scores.mIoU_new == 0.0
    assert scores.hIoU == 0.0  # harmonic mean with a zero side
    assert scores.mIoU_all == pytest.approx((50 + 100 / 3 + 100 / 3 + 0) / 4)


def test_all_nan_group_is_nan():
    matrix = np.zeros((3, 3), dtype=np.int64)
    matrix[0, 0] = 4
    matrix[1, 1] = 2
    scores = reduce_scores(matrix, old_classes=[1], new_classes=[2])
    assert math.isnan(scores.mIoU_new) and math.isnan(scores.hIoU)


def test_background_not_a_class():
    # ADE20K with ade_ignore_other: label 0 has no ground truth; one class-1 pixel is predicted as 0.
    matrix = np.array([[0, 0, 0], [1, 3, 0], [0, 1, 4]])
    scores = reduce_scores(matrix, old_classes=[1], new_classes=[2], background_is_class=False)
    assert scores.per_class_iou == pytest.approx({1: 60.0, 2: 80.0})  # 3/5, 4/5
    assert scores.mIoU_old == pytest.approx(60.0)
    assert scores.mIoU_all == pytest.approx(70.0)
    assert scores.mIoU_all_fg == pytest.approx(70.0)
    assert scores.hIoU == pytest.approx(2 * 60 * 80 / 140)


def test_reduce_scores_checks_the_groups():
    with pytest.raises(ValueError, match="both old and new"):
        reduce_scores(EXPECTED, old_classes=[1, 2], new_classes=[2])
    with pytest.raises(ValueError, match="exactly the matrix's foreground classes 1..2"):
        reduce_scores(EXPECTED, old_classes=[1], new_classes=[])
    with pytest.raises(ValueError, match="square"):
        reduce_scores(np.zeros((2, 3)), old_classes=[1], new_classes=[])


def test_predict_uses_foreground_argmax_and_threshold():
    background = [5.0, 5.0, 5.0, 5.0]  # never consulted
    first = [2.0, -1.0, -3.0, 0.0]
    second = [1.0, 3.0, -2.0, -0.5]
    logits = torch.tensor([background, first, second]).reshape(1, 3, 1, 4)
    assert predict(logits).tolist() == [[[1, 2, 0, 1]]]  # sigmoid(0) = 0.5 counts
    assert predict(logits, threshold=0.7).tolist() == [[[1, 2, 0, 0]]]  # logit(0.7) = 0.85
    assert predict(torch.zeros(2, 1, 3, 3)).sum() == 0
    with pytest.raises(ValueError, match="threshold"):
        predict(logits, threshold=1.0)


def test_mean_over_steps():
    assert mean_over_steps([70.0, 60.0, 50.0]) == pytest.approx(60.0)
    with pytest.raises(ValueError):
        mean_over_steps([])
