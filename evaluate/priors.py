"""Class-prior matching: give a trained student the teacher's class frequencies on unlabelled training images.

Why: the student learns what its teacher says of each appearance, so it is *mode-seeking*. Where the teacher
reads class A as its near-duplicate B on most of A's pixels and right on a minority (its per-pixel noise
spreads its answers), the student answers B on all of A, and A's IoU falls below the teacher's although the
student's scores still rank A's pixels above B's (the teacher's minority reading is in its targets).
Prior matching (label-shift correction, Saerens et al. 2002, on hard predictions) adds one bias per class to the
student's cosine scores so that its arg-max frequencies over training images equal the teacher's on the same
images; the classes a student collapses get their best-ranked pixels back. The teacher's own frequencies carry
its confusions, so matching every class also hands some of those back; the collapse guard (``mode="raise"``)
only raises the classes the student has (nearly) stopped predicting. It uses only what training used
(unlabelled images and the teacher's cached features), for any class list.

- :func:`fit_prior_bias`: ``(P, K)`` scores + ``(K,)`` target frequencies -> ``(K,)`` bias (zero-mean);
- :func:`prior_bias`: the bias of a student's class scores against the teacher's over some images (the caller
  scores both, e.g. with :func:`clips4.evaluate.language.similarity_logits`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["fit_prior_bias", "prior_bias", "class_frequencies", "COLLAPSE_RATIO"]

#: the collapse guard raises a class the student predicts at under this share of the teacher's frequency.
#: 0.85, not 0.5: in the yellow synthetic worlds a shrinking class sat at 0.54-0.79 of its share and cost its IoU
#: 5-8 points, while no class of the other worlds' students fell below 0.85 (the guard left them exactly as they
#: were; README, "Training seeds and machines")
COLLAPSE_RATIO = 0.85


def class_frequencies(labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(K,) float64`` share of each class id in ``labels`` (any shape, int64 in ``[0, k)``)."""
    c = torch.bincount(labels.flatten(), minlength=k).double()
    return c / c.sum().clamp_min(1)


def fit_prior_bias(scores: torch.Tensor, target: torch.Tensor, *, iters: int = 300, rate: float = 0.025,
                   floor: float = 1e-4, mode: str = "match", collapse_ratio: float = COLLAPSE_RATIO) -> torch.Tensor:
    """``(K,) float32`` additive bias for ``scores (P, K)`` (cosines) so that the frequencies of
    ``argmax(scores + bias)`` approach ``target (K,)``: damped multiplicative updates in log-frequency
    (``bias += rate * (log t - log s)``).

    ``mode``: ``match`` (every class, bias kept zero-mean; a class absent from ``target`` is pushed down) or
    ``raise`` (the collapse guard: only the classes whose frequency is below ``collapse_ratio`` x their target
    get a bias, >= 0, raising them towards their target; every other class keeps 0, so a student whose
    frequencies are near the teacher's is left as it is and no class is ever lowered on its own)."""
    if mode not in ("match", "raise"):
        raise ValueError(f"prior matching mode must be match or raise, got {mode!r}")
    if not 0 < collapse_ratio <= 1:
        raise ValueError(f"collapse ratio must be in (0, 1], got {collapse_ratio}")
    scores = scores.float()
    k = scores.shape[1]
    t = torch.as_tensor(target, dtype=torch.float64) + floor
    b = torch.zeros(k, dtype=torch.float32)
    low = (class_frequencies(scores.argmax(1), k) + floor < collapse_ratio * t).float()
    for _ in range(iters):
        s = class_frequencies((scores + b).argmax(1), k) + floor
        step = (rate * (t.log() - s.log())).float()
        if mode == "match":
            b = b + step
            b = b - b.mean()
        else:
            b = (b + low * step).clamp_min(0)
    return b


def prior_bias(records: Sequence, student: Callable, teacher: Callable, *, max_pixels: int = 400_000,
               seed: int = 0, mode: str = "match", collapse_ratio: float = COLLAPSE_RATIO) -> dict:
    """Bias of the student so its class frequencies over ``records`` equal the teacher's.

    ``student(record) -> (K, h, w)`` its class scores (cosines to the class text embeddings);
    ``teacher(record, (h, w)) -> (K, h, w)`` the teacher's (cached dense CLIP features) resized onto the student's
    grid, so both are counted on the same cells. At most ``max_pixels`` student score rows are kept (a seeded
    random subset) for the fit. ``mode``, ``collapse_ratio``: see :func:`fit_prior_bias`. Returns ``{"bias": (K,) float32 ndarray, "teacher_freq", "student_freq",
    "matched_freq": (K,) lists, "n_images"}``."""
    rows, t_count = [], None
    for rec in records:
        s = torch.as_tensor(student(rec)).float()
        k = s.shape[0]
        t = torch.as_tensor(teacher(rec, tuple(s.shape[1:])))
        c = torch.bincount(t.argmax(0).flatten(), minlength=k).double()
        t_count = c if t_count is None else t_count + c
        rows.append(s.flatten(1).t())
    if not rows:
        raise ValueError("prior matching needs at least one training image")
    scores = torch.cat(rows)
    if scores.shape[0] > max_pixels:
        g = torch.Generator().manual_seed(seed)
        scores = scores[torch.randperm(scores.shape[0], generator=g)[:max_pixels]]
    target = t_count / t_count.sum().clamp_min(1)
    bias = fit_prior_bias(scores, target, mode=mode, collapse_ratio=collapse_ratio)
    return {"bias": bias.numpy(), "mode": mode, "collapse_ratio": float(collapse_ratio), "teacher_freq": target.tolist(),
            "student_freq": class_frequencies(scores.argmax(1), k).tolist(),
            "matched_freq": class_frequencies((scores + bias).argmax(1), k).tolist(), "n_images": len(rows)}
