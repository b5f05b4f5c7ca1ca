"""Class calibration: give a trained student the teacher's class frequencies on unlabelled training images.

Why: the student learns what its teacher says of each appearance, so it is *mode-seeking*. Where the teacher
reads class A as its near-duplicate B on most of A's pixels and right on a minority (its per-pixel noise
spreads its answers), the student answers B on more and more of A the longer it trains, and A's IoU falls below
the teacher's although the student's scores still rank A's pixels above B's (the teacher's minority reading is
in its targets). Training cannot see this: it matches segment prototypes, and the collapse shows only against
the class *texts* the student is evaluated with.
Prior matching (label-shift correction, Saerens et al. 2002, on hard predictions) adds one bias per class to the
student's cosine scores so that its arg-max frequencies over training images equal the teacher's on the same
images; the classes a student collapses get their best-ranked pixels back. The teacher's own frequencies carry
its confusions, so matching every class also hands some of those back; the collapse guard (``mode="raise"``, the
default) only raises the classes the student predicts at under :data:`COLLAPSE_RATIO` of the teacher's share.
It uses only what training used (unlabelled images and the teacher's cached features), for any class list.

``clips4 train`` fits it once at the end (``train.calibration``, on the prototypes stage's class texts) and
stores it in ``final.pt`` (:func:`calibrate`); ``clips4 evaluate language`` applies it when the evaluated classes
and their texts are the calibrated ones (:func:`stored_bias`), or refits it on a split (``--prior-matching``).

- :func:`fit_prior_bias`: ``(P, K)`` scores + ``(K,)`` target frequencies -> ``(K,)`` bias;
- :func:`prior_bias`: the bias of a student's class scores against the teacher's over some images (the caller
  scores both, e.g. with :func:`clips4.trainer.inference.similarity_logits`);
- :func:`calibrate`: the calibration record of a network on a training cache, as ``final.pt`` stores it.
"""
from __future__ import annotations

from typing import Callable, Sequence, get_args

import numpy as np
import torch

from clips4.trainer.config import FIT_MODES, CalibrationMode, TrainParams

__all__ = ["fit_prior_bias", "prior_bias", "class_frequencies", "median_margin", "calibrate", "stored_bias",
           "segment_pooled", "agreement_miou", "agreement_scale", "guard_summary", "GUARD_SCALES", "COLLAPSE_RATIO",
           "MAX_BIAS_MARGINS", "MODES", "FIT_MODES"]

#: a class text embedding counts as the calibrated one at this cosine or more (float16 storage, another device)
TEXT_MATCH = 0.995

#: calibration modes (spelled once, in clips4.trainer.config): the fitted ones — ``raise`` (the collapse guard),
#: ``band`` (the guard both ways), ``match`` (every class) — and ``none``
MODES = get_args(CalibrationMode)

#: the collapse guard raises a class the student predicts at under this share of the teacher's frequency
#: (``train.calibration_ratio``'s default). 0.85, not 0.5: in the yellow synthetic worlds a shrinking class sat at
#: 0.42-0.72 of its (segment-pooled) share and cost its IoU 5-8 points; it also fires at 0.76-0.85 on classes the
#: teacher over-predicts, at a cost of up to 5 mIoU (docs/design.md, "The class calibration")
COLLAPSE_RATIO: float = TrainParams.model_fields["calibration_ratio"].default

#: the collapse guard raises a class by at most this many median margins (top-1 minus top-2 score over the fitted
#: pixels; ``train.calibration_max_margins``'s default). A bias is a threshold correction; past the network's own
#: typical margin it overrides it and paints the class on pixels it does not rank near the top (seen: a 30-step
#: student got +21 on cosines). Every helpful raise measured on the sweep used 0.11-0.88 margins
MAX_BIAS_MARGINS: float = TrainParams.model_fields["calibration_max_margins"].default


def class_frequencies(labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(K,) float64`` share of each class id in ``labels`` (any shape, int64 in ``[0, k)``)."""
    c = torch.bincount(labels.flatten(), minlength=k).double()
    return c / c.sum().clamp_min(1)


#: added to every class frequency before ratios and logs, so an absent class has a finite share
FREQ_FLOOR = 1e-4


def _below_trigger(freq: torch.Tensor, target: torch.Tensor, collapse_ratio: float, floor: float) -> torch.Tensor:
    """``(K,) bool``: the classes the collapse guard raises (frequency under ``collapse_ratio`` x the target)."""
    return torch.as_tensor(freq, dtype=torch.float64) + floor < collapse_ratio * (
        torch.as_tensor(target, dtype=torch.float64) + floor)


def _above_trigger(freq: torch.Tensor, target: torch.Tensor, collapse_ratio: float, floor: float) -> torch.Tensor:
    """``(K,) bool``: the classes ``band`` lowers (frequency over the target / ``collapse_ratio``)."""
    return collapse_ratio * (torch.as_tensor(freq, dtype=torch.float64) + floor) > (
        torch.as_tensor(target, dtype=torch.float64) + floor)


def median_margin(scores: torch.Tensor) -> float:
    """The median over rows of ``scores (P, K)`` of the top-1 minus the top-2 score: the network's typical decisiveness,
    in the scores' own units (so a cap in margins means the same for any CLIP model's cosine scale)."""
    s = scores.float()
    if s.shape[1] < 2 or not len(s):
        return 0.0
    top = s.topk(2, dim=1).values
    return float((top[:, 0] - top[:, 1]).median())


def fit_prior_bias(scores: torch.Tensor, target: torch.Tensor, *, iters: int = 300, rate: float = 0.025,
                   floor: float = FREQ_FLOOR, mode: str = "match", collapse_ratio: float = COLLAPSE_RATIO,
                   max_bias: float | None = None) -> torch.Tensor:
    """``(K,) float32`` additive bias for ``scores (P, K)`` (cosines) so that the frequencies of
    ``argmax(scores + bias)`` approach ``target (K,)``: damped multiplicative updates in log-frequency
    (``bias += rate * (log t - log s)``).

    ``mode``: ``match`` (every class, bias kept zero-mean; a class absent from ``target`` is pushed down; the
    iterate nearest the target is returned, so never one further from it than no bias),
    ``raise`` (the collapse guard: only the classes whose frequency is below ``collapse_ratio`` x their target
    get a bias, >= 0, raising them towards their target; every other class keeps 0, so a student whose
    frequencies are near the teacher's is left as it is and no class is ever lowered on its own) or ``band``
    (``raise``, and the classes above their target / ``collapse_ratio`` get a bias <= 0 lowering them towards it:
    the class that took a collapsed class's pixels is usually the one the student over-predicts). ``max_bias``
    (``raise`` / ``band``; ``None`` = no cap): no class is moved by more, however far from its target it stays."""
    if mode not in FIT_MODES:
        raise ValueError(f"prior matching mode must be match, raise or band, got {mode!r}")
    if not 0 < collapse_ratio <= 1:
        raise ValueError(f"collapse ratio must be in (0, 1], got {collapse_ratio}")
    scores = scores.float()
    k = scores.shape[1]
    t = torch.as_tensor(target, dtype=torch.float64) + floor
    b = torch.zeros(k, dtype=torch.float32)
    freq0 = class_frequencies(scores.argmax(1), k)
    low = _below_trigger(freq0, target, collapse_ratio, floor)
    high = _above_trigger(freq0, target, collapse_ratio, floor) & (mode == "band")
    # raise / band: a triggered class moves within [0, cap] (raised) or [-cap, 0] (lowered), every other one stays 0
    cap = torch.tensor(float("inf") if max_bias is None else float(max_bias))
    upper, lower = torch.where(low, cap, 0.0), torch.where(high, -cap, 0.0)
    # match: the iterate closest to the target (L1 over the frequencies), no bias included — a student that ranks
    # one class first everywhere makes the updates hand the whole image from class to class, and the last
    # iterate can then be further from the target than no bias at all
    best, best_gap = b, float("inf")
    for _ in range(iters):
        s = class_frequencies((scores + b).argmax(1), k) + floor
        if mode == "match":
            gap = float((s - t).abs().sum())
            if gap < best_gap:
                best, best_gap = b, gap
        step = (rate * (t.log() - s.log())).float()
        if mode == "match":
            b = b + step
            b = b - b.mean()
        else:
            b = torch.clamp(b + step, lower, upper)
    if mode == "match":
        s = class_frequencies((scores + b).argmax(1), k) + floor
        return b if float((s - t).abs().sum()) < best_gap else best
    return b


#: the fractions of a fitted bias the agreement guard tries (see :func:`agreement_scale`)
GUARD_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def agreement_miou(pred: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    """Mean IoU over the classes present in either of two ``(P,)`` int64 label vectors."""
    inter = torch.bincount(ref[pred == ref], minlength=k).double()
    union = torch.bincount(pred, minlength=k).double() + torch.bincount(ref, minlength=k).double() - inter
    ok = union > 0
    return float((inter[ok] / union[ok]).mean()) if bool(ok.any()) else 0.0


def agreement_scale(scores: torch.Tensor, bias: torch.Tensor, teacher_labels: torch.Tensor,
                    scales: Sequence[float] = GUARD_SCALES) -> tuple[float, dict]:
    """The fraction of ``bias`` to keep: the one whose arg-max agrees best (mean IoU) with the teacher's labels on
    the fitted pixels, ``(scale, {scale: agreement})``. Why: frequencies are a proxy. A class the student does not
    recognise yet, raised to its share, takes the pixels it ranks second on — another class's, which the teacher
    labels right — so the shares match and both classes are lost (a 300-step student: one class raised from 0.9 %
    to the teacher's 9 % took two others from IoU 49 and 48 to 0 and 1). A raise that gives a collapsed class its
    own pixels back agrees better with the teacher and is kept whole."""
    k = scores.shape[1]
    got = {float(a): agreement_miou((scores + a * bias).argmax(1), teacher_labels, k) for a in scales}
    best = max(got.values())
    return max(a for a, v in got.items() if v >= best - 1e-12), got


def guard_summary(record: dict) -> str:
    """How much of a fitted bias the agreement guard kept, for a log line: ``"; 0.5 of the fitted bias kept (mean IoU
    with the teacher's labels: ...)"``, or ``""`` where the guard did not run (off, or nothing fitted)."""
    ag = record.get("agreement")
    if not ag:
        return ""
    scale = float(record["scale"])
    return (f"; {scale:g} of the fitted bias kept (mean IoU with the teacher's labels: {100 * ag['0.0']:.1f} with "
            f"none, {100 * ag['1.0']:.1f} with all, {100 * ag[str(scale)]:.1f} kept)")


def prior_bias(records: Sequence, student: Callable, teacher: Callable, *, max_pixels: int = 400_000,
               seed: int = 0, mode: str = "match", collapse_ratio: float = COLLAPSE_RATIO,
               max_margins: float | None = MAX_BIAS_MARGINS, guard: bool = True) -> dict:
    """Bias of the student so its class frequencies over ``records`` equal the teacher's.

    ``student(record) -> (K, h, w)`` its class scores (cosines to the class text embeddings);
    ``teacher(record, (h, w)) -> (K, h, w)`` the teacher's (cached dense CLIP features) resized onto the student's
    grid, so both are counted on the same cells. At most ``max_pixels`` student score rows are kept (a seeded
    random subset) for the fit. ``mode``, ``collapse_ratio``: see :func:`fit_prior_bias`; ``max_margins``: with
    ``mode="raise"`` / ``"band"``, the cap on a bias in median margins (:func:`median_margin`; ``None`` = none).
    ``guard``: keep only the fraction of the fitted bias that agrees best with the teacher's labels
    (:func:`agreement_scale`). Returns ``{"bias": (K,) float32 ndarray, "teacher_freq", "student_freq",
    "matched_freq": (K,) lists, "n_images", "max_bias": the cap in score units or None, "capped": [class indices
    held at the cap], "scale": the fraction kept, "agreement": {fraction: mean IoU with the teacher}}``."""
    rows, t_rows, t_count = [], [], None
    for rec in records:
        s = torch.as_tensor(student(rec)).float()
        k = s.shape[0]
        t = torch.as_tensor(teacher(rec, tuple(s.shape[1:]))).argmax(0).flatten()
        c = torch.bincount(t, minlength=k).double()
        t_count = c if t_count is None else t_count + c
        rows.append(s.flatten(1).t())
        t_rows.append(t)
    if not rows:
        raise ValueError("prior matching needs at least one training image")
    scores, labels = torch.cat(rows), torch.cat(t_rows)
    if scores.shape[0] > max_pixels:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(scores.shape[0], generator=g)[:max_pixels]
        scores, labels = scores[keep], labels[keep]
    target = t_count / t_count.sum().clamp_min(1)
    cap = None if mode == "match" or max_margins is None else float(max_margins) * median_margin(scores)
    bias = fit_prior_bias(scores, target, mode=mode, collapse_ratio=collapse_ratio, max_bias=cap)
    scale, agreement = 1.0, {}
    if guard and bool((bias != 0).any()):
        scale, agreement = agreement_scale(scores, bias, labels)
        bias = bias * scale
    student_freq = class_frequencies(scores.argmax(1), k)
    # a class raised to the cap (the warning is about classes the network cannot give back; a lowered one is not)
    capped = [] if cap is None else [c for c in range(k) if float(bias[c]) >= cap * (1 - 1e-6)]
    return {"bias": bias.numpy(), "mode": mode, "collapse_ratio": float(collapse_ratio), "max_bias": cap,
            "capped": capped, "scale": float(scale), "agreement": {str(a): v for a, v in agreement.items()},
            "teacher_freq": target.tolist(), "student_freq": student_freq.tolist(),
            "matched_freq": class_frequencies((scores + bias).argmax(1), k).tolist(), "n_images": len(rows)}


def segment_pooled(features: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """``(h, w, D) float32`` teacher features with every grid cell replaced by the mean embedding of its segment
    (``labels``: the segments stage's superpixels at any resolution, taken to the grid by majority; cells of no
    segment keep their own). Why: the teacher's per-pixel noise (random-class patches, Gaussian noise) flattens its
    class frequencies towards uniform, so a rare class looks under-predicted by an *accurate* student; over a
    segment that noise averages out, while a class the teacher reads right on a plurality of its pixels keeps its
    share."""
    from clips4.pipeline.prototypes import labels_to_grid, segment_embeddings

    feats = np.asarray(features, np.float32)
    if labels is None:
        return feats
    grid = labels_to_grid(np.asarray(labels), feats.shape[:2])
    seg = segment_embeddings(feats, grid)
    if not len(seg.segment_id):
        return feats
    out = feats.copy()
    ok = grid >= 0
    out[ok] = seg.embedding[np.searchsorted(seg.segment_id, grid[ok])]
    return out


def cached_teacher(features, segments) -> Callable[[object], np.ndarray]:
    """``record -> (h, w, D)`` the teacher as training and evaluation both calibrate against: its cached CLIP
    features (a clip_features ``StageReader``) pooled over its cached segments (a segments ``StageReader``)."""
    return lambda r: segment_pooled(features.get(r.image_id, "features"), segments.get(r.image_id, "labels"))


def calibrate(embed: Callable[[object], np.ndarray], records: Sequence, teacher: Callable[[object], np.ndarray],
              names: Sequence[str], text: np.ndarray, *, mode: str = "raise", collapse_ratio: float = COLLAPSE_RATIO,
              max_margins: float | None = MAX_BIAS_MARGINS, max_images: int = 512, guard: bool = True) -> dict:
    """The class calibration of a student, as ``final.pt`` stores it under ``calibration``.

    ``embed(record) -> (h, w, D)`` the student's pixel embeddings of a training image (e.g.
    :func:`clips4.trainer.inference.model_embedder` on its pixels); ``teacher(record) -> (h', w', D)`` its cached
    CLIP features, pooled over its segments (:func:`segment_pooled`); ``names`` / ``text (K, D)`` the known classes and their text embeddings (the prototypes stage's
    ``text.parquet``). At most ``max_images`` records, evenly spaced, are used. ``max_margins``: see
    :func:`prior_bias`. Returns ``{"mode", "collapse_ratio", "max_bias", "capped" (class names), "classes",
    "bias": [K floats], "text": (K, D) float16 tensor (what it was fitted against), "teacher_freq",
    "student_freq", "matched_freq", "n_images"}``."""
    from clips4.trainer.inference import similarity_logits

    if mode not in FIT_MODES:
        raise ValueError(f"calibration mode must be raise, band or match, got {mode!r}")
    text = np.asarray(text, np.float32)
    if len(names) != len(text):
        raise ValueError(f"{len(names)} class names for {len(text)} text embeddings")
    picked = [records[i] for i in np.unique(np.linspace(0, len(records) - 1, min(max_images, len(records)))
                                              .round().astype(int))] if len(records) else []
    with torch.no_grad():
        r = prior_bias(picked, lambda rec: similarity_logits(embed(rec), text, layout="hwd"),
                       lambda rec, hw: similarity_logits(np.asarray(teacher(rec), np.float32), text, hw, layout="hwd"),
                       mode=mode, collapse_ratio=collapse_ratio, max_margins=max_margins, guard=guard)
    return {**r, "bias": [float(b) for b in r["bias"]], "classes": list(names), "capped": [names[i] for i in r["capped"]],
            "text": torch.from_numpy(text).half()}


def stored_bias(calibration: dict | None, names: Sequence[str], text: np.ndarray,
                uncalibrated: Sequence[str] = ()) -> tuple[np.ndarray | None, str]:
    """``((K,) float32 bias for ``names``, "")`` from a checkpoint's ``calibration`` record when every evaluated
    class is a calibrated one with the same text embedding (a subset is fine, e.g. VOC without background);
    otherwise ``(None, why)``: a calibration is only meaningful against the class texts it was fitted on.
    ``uncalibrated``: evaluated classes that were never trained classes (VOC-21's ``background``): bias 0."""
    if not calibration or not calibration.get("classes"):
        return None, "the checkpoint holds no class calibration (train.calibration: none, or trained before it existed)"
    cal = list(calibration["classes"])
    missing = [n for n in names if n not in cal and n not in uncalibrated]
    if missing:
        return None, (f"the checkpoint was calibrated on {len(cal)} classes and {len(missing)} of the evaluated "
                      f"{'class is' if len(missing) == 1 else 'classes are'} not among them (e.g. {missing[0]!r})")
    pos = [k for k, n in enumerate(names) if n in cal]
    if not pos:
        return None, "none of the evaluated classes is a calibrated one"
    idx = [cal.index(names[k]) for k in pos]
    fitted = calibration.get("text")
    if fitted is not None:
        a = torch.nn.functional.normalize(torch.as_tensor(fitted).float()[idx], dim=1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text, np.float32))[pos], dim=1)
        if a.shape != b.shape or float((a * b).sum(1).min()) < TEXT_MATCH:
            return None, ("the evaluated class texts differ from the ones the checkpoint was calibrated on (another "
                          "CLIP model or prompts)")
    bias = np.zeros(len(names), np.float32)
    bias[pos] = np.asarray(calibration["bias"], np.float32)[idx]
    return bias, ""
