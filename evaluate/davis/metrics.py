"""DAVIS 2017 J / F metrics.

The DAVIS 2017 toolkit (``davisvideochallenge/davis2017-evaluation``), reproduced:

* ``davis2017/metrics.py``: ``db_eval_iou`` (J; union 0 -> 1), ``f_measure`` / ``db_eval_boundary`` (F) with
  ``_seg2bmap`` boundaries, ``bound_pix = bound_th if bound_th >= 1 else ceil(bound_th * ||(H, W)||)``, dilation
  with ``skimage.morphology.disk(bound_pix)`` (``cv2.dilate``), empty conventions: both boundaries empty ->
  P = R = 1; prediction empty -> P = 1, R = 0; GT empty -> P = 0, R = 1; F = 0 when P + R = 0;
* ``davis2017/davis.py get_all_masks``: GT 255 (void) is set to 0, number of objects = max id of the *first*
  annotation, per-object binary masks ``mask == id``;
* ``davis2017/evaluation.py``: for the semi-supervised task the first and last frames are dropped
  (``all_gt_masks[:, 1:-1]``), void masks are *not* used (``_evaluate_semisupervised(..., None, ...)``), a result
  with fewer objects is zero-padded, one with more objects is an error;
* ``davis2017/utils.py db_statistics``: per object mean ``M = nanmean``, recall ``R = nanmean(x > 0.5)`` and decay
  ``D`` (first-quarter minus last-quarter mean);
* ``evaluation_method.py``: ``J&F-Mean = (mean_objects(J-M) + mean_objects(F-M)) / 2``; J-Mean / F-Mean are means
  over *all objects of all sequences* (each object weighs the same). Per-sequence numbers here are the means over
  that sequence's objects (the toolkit's per-sequence CSV lists objects as ``<seq>_<i>``; both are reported).
"""
from __future__ import annotations

import warnings

import cv2
import numpy as np


__all__ = ["db_eval_iou", "seg2bmap", "f_measure", "db_eval_boundary", "db_statistics", "evaluate_sequence",
           "summarize"]


def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None):
    """Region similarity J (Jaccard) for binary masks ``(H, W)`` or ``(T, H, W)``; union 0 -> 1."""
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ")
    keep = np.ones_like(annotation) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    inters = np.sum(segmentation & annotation & keep, axis=(-2, -1))
    union = np.sum((segmentation | annotation) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inters / union
    if np.ndim(j) == 0:
        return 1.0 if union == 0 else float(j)
    j = np.asarray(j, dtype=np.float64)
    j[union == 0] = 1.0
    return j


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary map of a binary mask, offset half a pixel towards the origin (D. Martin's
    ``seg2bmap`` as used by the toolkit): a pixel is a boundary pixel when it differs from its east, south or
    south-east neighbour; the last row only compares east, the last column only south, the corner is 0."""
    seg = np.asarray(seg).astype(bool)
    if seg.ndim != 2:
        raise ValueError("seg2bmap expects a 2-D mask")
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    try:  # the toolkit's structuring element
        from skimage.morphology import disk

        return disk(radius).astype(np.uint8)
    except ImportError:  # pragma: no cover - same definition: x^2 + y^2 <= r^2
        r = int(radius)
        y, x = np.mgrid[-r : r + 1, -r : r + 1]
        return ((x * x + y * y) <= r * r).astype(np.uint8)


def f_measure(
    foreground_mask: np.ndarray,
    gt_mask: np.ndarray,
    void_pixels: np.ndarray | None = None,
    bound_th: float = 0.008,
) -> float:
    """Boundary F-measure of one frame (the toolkit's ``f_measure``)."""
    fg = np.asarray(foreground_mask).astype(bool)
    gt = np.asarray(gt_mask).astype(bool)
    keep = np.ones_like(fg) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
    fg_boundary = seg2bmap(fg & keep)
    gt_boundary = seg2bmap(gt & keep)
    se = _disk(int(bound_pix))
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), se)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), se)
    gt_match = gt_boundary & (fg_dil > 0)
    fg_match = fg_boundary & (gt_dil > 0)
    n_fg = int(fg_boundary.sum())
    n_gt = int(gt_boundary.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = fg_match.sum() / float(n_fg)
        recall = gt_match.sum() / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, void_pixels=None, bound_th: float = 0.008):
    """F for ``(H, W)`` (float) or ``(T, H, W)`` (array of per-frame values); note the argument order
    (annotation first) is the toolkit's."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ")
    if annotation.ndim == 3:
        return np.array(
            [
                f_measure(segmentation[i], annotation[i], None if void_pixels is None else void_pixels[i], bound_th)
                for i in range(annotation.shape[0])
            ]
        )
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, void_pixels, bound_th)
    raise ValueError(f"db_eval_boundary does not support {annotation.ndim}-D input")


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values as the toolkit's ``db_statistics`` (NaN-tolerant; the bin
    indices are int64 where the toolkit casts to uint8, identical below 256 frames)."""
    v = np.asarray(per_frame_values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        m = float(np.nanmean(v)) if v.size else float("nan")
        r = float(np.nanmean(v > 0.5)) if v.size else float("nan")
        n_bins = 4
        ids = (np.round(np.linspace(1, len(v), n_bins + 1) + 1e-10) - 1).astype(np.int64)
        bins = [v[ids[i] : ids[i + 1] + 1] for i in range(n_bins)]
        d = float(np.nanmean(bins[0]) - np.nanmean(bins[3])) if v.size else float("nan")
    return m, r, d


def _split_objects(masks: np.ndarray, n_objects: int) -> np.ndarray:
    """``(T, H, W)`` ids -> ``(n_objects, T, H, W)`` bool with ``[k] = masks == k + 1``."""
    ids = np.arange(1, n_objects + 1)[:, None, None, None]
    return masks[None] == ids


def evaluate_sequence(
    gt_masks: np.ndarray,
    pred_masks: np.ndarray,
    *,
    semi_supervised: bool = True,
    bound_th: float = 0.008,
    scored: np.ndarray | None = None,
) -> dict:
    """J and F of one sequence. ``gt_masks`` / ``pred_masks``: ``(T, H, W)`` integer ids (0 = background).

    Semi-supervised protocol of the toolkit: 255 in GT -> 0, objects = ``1..max(gt[0])``, frames ``1..T-2``
    scored (first and last dropped), missing predicted objects are empty masks, extra predicted ids raise.
    ``scored`` ``(T,) bool`` (default all): frames without a ground-truth annotation are passed as False and left
    out of the statistics (frame 0 must be annotated: it defines the objects).
    Returns per-object per-frame lists and statistics, plus the sequence means over objects.
    """
    gt = np.asarray(gt_masks).astype(np.int64).copy()
    pred = np.asarray(pred_masks).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"GT {gt.shape} and prediction {pred.shape} shapes differ")
    gt[gt == 255] = 0
    n_obj = int(gt[0].max()) if gt.size else 0
    keep = np.ones(gt.shape[0], bool) if scored is None else np.asarray(scored, bool).copy()
    if keep.shape != (gt.shape[0],):
        raise ValueError(f"scored has shape {keep.shape}, expected ({gt.shape[0]},)")
    if semi_supervised:
        gt, pred, keep = gt[1:-1], pred[1:-1], keep[1:-1]
    gt, pred = gt[keep], pred[keep]
    n_pred = int(pred.max()) if pred.size else 0
    if n_pred > n_obj:
        raise ValueError(f"prediction has object id {n_pred} but the first annotation has only {n_obj} objects")
    gt_obj = _split_objects(gt, n_obj)
    pred_obj = _split_objects(pred, n_obj)
    objects = []
    for k in range(n_obj):
        j = np.atleast_1d(db_eval_iou(gt_obj[k], pred_obj[k])) if gt.shape[0] else np.zeros(0)
        f = np.atleast_1d(db_eval_boundary(gt_obj[k], pred_obj[k], bound_th=bound_th)) if gt.shape[0] else np.zeros(0)
        jm, jr, jd = db_statistics(j)
        fm, fr, fd = db_statistics(f)
        objects.append(
            {
                "object": k + 1,
                "J": {"M": jm, "R": jr, "D": jd},
                "F": {"M": fm, "R": fr, "D": fd},
                "J_per_frame": [float(x) for x in j],
                "F_per_frame": [float(x) for x in f],
            }
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        jmean = float(np.nanmean([o["J"]["M"] for o in objects])) if objects else float("nan")
        fmean = float(np.nanmean([o["F"]["M"] for o in objects])) if objects else float("nan")
    return {
        "n_objects": n_obj,
        "n_frames_scored": int(gt.shape[0]),
        "objects": objects,
        "J": jmean,
        "F": fmean,
        "J&F": (jmean + fmean) / 2,
    }


def summarize(per_sequence: dict[str, dict]) -> dict:
    """Toolkit global numbers from :func:`evaluate_sequence` outputs: means over all objects."""
    jm, fm, jr, fr, jd, fd = [], [], [], [], [], []
    per_object = {}
    for seq, res in per_sequence.items():
        for o in res["objects"]:
            jm.append(o["J"]["M"]), fm.append(o["F"]["M"])
            jr.append(o["J"]["R"]), fr.append(o["F"]["R"])
            jd.append(o["J"]["D"]), fd.append(o["F"]["D"])
            per_object[f"{seq}_{o['object']}"] = {"J": o["J"]["M"], "F": o["F"]["M"]}
    mean = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731 - toolkit uses np.mean
    j, f = mean(jm), mean(fm)
    return {
        "J&F-Mean": (j + f) / 2,
        "J-Mean": j,
        "J-Recall": mean(jr),
        "J-Decay": mean(jd),
        "F-Mean": f,
        "F-Recall": mean(fr),
        "F-Decay": mean(fd),
        "n_objects": len(jm),
        "per_object": per_object,
    }
