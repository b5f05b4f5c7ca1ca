"""Semantic segmentation metrics (confusion-matrix based, mmseg conventions).

Conventions (identical to mmseg's ``eval_metrics`` / ``total_area_to_metrics``):

* pixels whose ground truth equals ``ignore_index`` (or is outside ``0..num_classes-1``) are skipped;
* per class ``c``: ``IoU = TP / (TP + FP + FN)`` with ``TP + FP + FN`` = area(pred == c) + area(gt == c) - TP,
  counted over the evaluated (non-ignored) pixels only;
* a class whose union is 0 (absent from both GT and prediction in everything accumulated) gets ``NaN``
  and is excluded from ``miou`` (a ``nanmean``); a class that is predicted but never in the GT has IoU 0
  and *is* included;
* ``pixel_accuracy`` = sum(TP) / number of evaluated pixels;
  ``mean_accuracy`` = nanmean over classes of TP / area(gt == c) (classes absent from GT are NaN);
* predictions outside ``0..num_classes-1`` (e.g. 255 written by a model for "unknown") count as wrong:
  they are a false negative for the GT class and a false positive for no class.

Accumulate with :meth:`ConfusionMatrix.update` per image (the numbers are *dataset-level*: areas are summed
over all images before dividing, as in mmseg), and combine per-worker matrices with :meth:`merge`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

__all__ = ["ConfusionMatrix", "harmonic_mean"]


class ConfusionMatrix:
    """Dataset-level confusion matrix ``mat[gt, pred]`` (int64) for ``num_classes`` classes."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes <= 0:
            raise ValueError("num_classes must be positive")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        # Pixels with a valid GT class whose prediction is not a valid class id (counted as FN of gt).
        self.invalid_pred = np.zeros(self.num_classes, dtype=np.int64)

    # ------------------------------------------------------------------ accumulation
    def update(self, pred: np.ndarray, gt: np.ndarray) -> "ConfusionMatrix":
        """Add one prediction / ground-truth pair (same shape, integer ids)."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
        gt = gt.reshape(-1).astype(np.int64)
        pred = pred.reshape(-1).astype(np.int64)
        n = self.num_classes
        valid = (gt != self.ignore_index) & (gt >= 0) & (gt < n)
        gt = gt[valid]
        pred = pred[valid]
        ok = (pred >= 0) & (pred < n)
        if ok.any():
            self.mat += np.bincount(gt[ok] * n + pred[ok], minlength=n * n).reshape(n, n)
        if (~ok).any():
            self.invalid_pred += np.bincount(gt[~ok], minlength=n)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts into this one (per-worker / distributed accumulation)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class one")
        self.mat += other.mat
        self.invalid_pred += other.invalid_pred
        return self

    def reset(self) -> None:
        self.mat[:] = 0
        self.invalid_pred[:] = 0

    # ------------------------------------------------------------------ areas
    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.mat).astype(np.int64)

    @property
    def area_gt(self) -> np.ndarray:
        return self.mat.sum(1) + self.invalid_pred

    @property
    def area_pred(self) -> np.ndarray:
        return self.mat.sum(0)

    @property
    def total(self) -> int:
        return int(self.area_gt.sum())

    # ------------------------------------------------------------------ metrics
    def per_class_iou(self) -> np.ndarray:
        """``(num_classes,)`` float64 IoU; NaN where union is 0 (class absent from GT and prediction)."""
        union = (self.area_gt + self.area_pred - self.tp).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.tp / union
        iou[union == 0] = np.nan
        return iou

    def per_class_accuracy(self) -> np.ndarray:
        """``(num_classes,)`` recall TP / area(gt); NaN for classes absent from GT."""
        gt = self.area_gt.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = self.tp / gt
        acc[gt == 0] = np.nan
        return acc

    def miou(self) -> float:
        """nanmean of :meth:`per_class_iou` (NaN if nothing was accumulated)."""
        return _nanmean(self.per_class_iou())

    def pixel_accuracy(self) -> float:
        total = self.total
        return float(self.tp.sum() / total) if total else float("nan")

    def mean_accuracy(self) -> float:
        return _nanmean(self.per_class_accuracy())

    def miou_over(self, class_ids: Sequence[int]) -> float:
        """mIoU restricted to a subset of classes (e.g. known / unknown folds); NaN classes skipped."""
        ids = np.asarray(list(class_ids), dtype=np.int64)
        if ids.size == 0:
            return float("nan")
        return _nanmean(self.per_class_iou()[ids])

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-friendly summary: ``miou``, ``pixel_accuracy``, ``mean_accuracy``, per-class IoU / accuracy
        (``None`` for NaN), pixel counts. Names default to ``class_<i>``."""
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        iou = self.per_class_iou()
        acc = self.per_class_accuracy()
        return {
            "miou": _none_if_nan(self.miou()),
            "pixel_accuracy": _none_if_nan(self.pixel_accuracy()),
            "mean_accuracy": _none_if_nan(self.mean_accuracy()),
            "num_classes": self.num_classes,
            "num_classes_evaluated": int(np.sum(~np.isnan(iou))),
            "pixels": self.total,
            "per_class_iou": {n: _none_if_nan(v) for n, v in zip(names, iou)},
            "per_class_accuracy": {n: _none_if_nan(v) for n, v in zip(names, acc)},
            "convention": "mmseg: dataset-level areas; classes with union 0 are NaN and excluded from the mean",
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total}, miou={self.miou():.4f})"


def harmonic_mean(a: float, b: float) -> float:
    """hIoU of the paper's Table 3: 2ab / (a + b) (NaN if either is NaN, 0 if both are 0)."""
    if np.isnan(a) or np.isnan(b):
        return float("nan")
    return 0.0 if a + b == 0 else float(2 * a * b / (a + b))


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.all(np.isnan(x)):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.nanmean(x))


def _none_if_nan(v: float):
    v = float(v)
    return None if np.isnan(v) else v
