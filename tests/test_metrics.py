import math

import numpy as np
import pytest

from clips4.evaluate.metrics import ConfusionMatrix, harmonic_mean


def test_perfect_prediction():
    gt = np.array([[0, 1], [2, 2]])
    cm = ConfusionMatrix(3).update(gt, gt)
    assert cm.miou() == 1.0
    assert cm.pixel_accuracy() == 1.0
    assert cm.mean_accuracy() == 1.0


def test_hand_computed_with_ignore_and_absent_class():
    # 4 classes; class 3 absent from GT and prediction -> NaN, excluded from mIoU
    gt = np.array([[0, 0, 1, 255], [1, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 3 - 3], [1, 2, 2, 2]])  # the ignored pixel's prediction (0) does not count
    cm = ConfusionMatrix(4, ignore_index=255).update(pred, gt)
    # class 0: TP 1, gt 2, pred 1 -> 1/2 ; class 1: TP 2, gt 3, pred 3 -> 2/4 ; class 2: TP 2, gt 2, pred 3 -> 2/3
    iou = cm.per_class_iou()
    assert iou[0] == pytest.approx(0.5)
    assert iou[1] == pytest.approx(0.5)
    assert iou[2] == pytest.approx(2 / 3)
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)
    assert cm.mean_accuracy() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    d = cm.to_dict(["a", "b", "c", "d"])
    assert d["per_class_iou"]["d"] is None and d["num_classes_evaluated"] == 3 and d["pixels"] == 7


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    gt = np.zeros((2, 2), int)
    pred = np.array([[0, 0], [0, 1]])
    cm = ConfusionMatrix(3).update(pred, gt)
    iou = cm.per_class_iou()
    assert iou[0] == pytest.approx(3 / 4) and iou[1] == 0.0 and math.isnan(iou[2])
    assert cm.miou() == pytest.approx(3 / 8)


def test_empty_prediction_and_all_ignored():
    gt = np.array([[1, 1], [255, 255]])
    pred = np.full((2, 2), 255)  # "no prediction": invalid ids count as misses of the GT class
    cm = ConfusionMatrix(2).update(pred, gt)
    assert cm.per_class_iou()[1] == 0.0 and math.isnan(cm.per_class_iou()[0])
    assert cm.miou() == 0.0 and cm.pixel_accuracy() == 0.0
    empty = ConfusionMatrix(2).update(np.zeros((2, 2)), np.full((2, 2), 255))
    assert math.isnan(empty.miou()) and empty.to_dict()["miou"] is None


def test_dataset_level_accumulation_and_merge():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    gts = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    whole = ConfusionMatrix(5)
    for p, g in zip(preds, gts):
        whole.update(p, g)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    for p, g in zip(preds[:2], gts[:2]):
        a.update(p, g)
    for p, g in zip(preds[2:], gts[2:]):
        b.update(p, g)
    a.merge(b)
    assert np.array_equal(a.mat, whole.mat)
    assert a.miou() == pytest.approx(whole.miou())
    # reference: IoU from concatenated pixels
    P, G = np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts])
    ref = [np.sum((P == c) & (G == c)) / np.sum((P == c) | (G == c)) for c in range(5)]
    assert whole.miou() == pytest.approx(np.mean(ref))
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))


def test_shape_mismatch_and_harmonic_mean():
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((2, 3)))
    assert harmonic_mean(0.3, 0.6) == pytest.approx(0.4)
    assert harmonic_mean(0.0, 0.0) == 0.0
