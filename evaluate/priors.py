"""Class-prior matching: give a trained student the teacher's class frequencies on unlabelled training images.

Why: the student learns what its teacher says of each appearance, so it is *mode-seeking*. Where the teacher
reads class A as its near-duplicate B on most of A's pixels and right on a minority (its per-pixel noise
spreads its answers), the student answers B on all of A, and A's IoU falls below the teacher's although the
student's scores still rank A's pixels above B's (the teacher's minority reading is in its targets).
Prior matching (label-shift correction, Saerens et al. 2002, on hard predictions) adds one bias per class to the
student's cosine scores so that its arg-max frequencies over training images equal the teacher's on the same
images; the classes a student collapses get their best-ranked pixels back. It uses only what training used
(unlabelled images and the teacher's cached features), for any class list.

- :func:`fit_prior_bias`: ``(P, K)`` scores + ``(K,)`` target frequencies -> ``(K,)`` bias (zero-mean);
- :func:`prior_bias`: the bias of an embedding source against the teacher on a dataset's cached features.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["fit_prior_bias", "prior_bias", "class_frequencies"]


def class_frequencies(labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(K,) float64`` share of each class id in ``labels`` (any shape, int64 in ``[0, k)``)."""
    c = torch.bincount(labels.flatten(), minlength=k).double()
    return c / c.sum().clamp_min(1)


def fit_prior_bias(scores: torch.Tensor, target: torch.Tensor, *, iters: int = 300, rate: float = 0.025,
                   floor: float = 1e-4) -> torch.Tensor:
    """``(K,) float32`` additive bias for ``scores (P, K)`` (cosines) so that the frequencies of
    ``argmax(scores + bias)`` approach ``target (K,)``: damped multiplicative updates in log-frequency
    (``bias += rate * (log t - log s)``), kept zero-mean. A class absent from ``target`` is pushed down."""
    scores = scores.float()
    k = scores.shape[1]
    t = torch.as_tensor(target, dtype=torch.float64) + floor
    b = torch.zeros(k, dtype=torch.float32)
    for _ in range(iters):
        s = class_frequencies((scores + b).argmax(1), k) + floor
        b = b + (rate * (t.log() - s.log())).float()
        b = b - b.mean()
    return b


def _scores(emb: np.ndarray, text: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
    """``(K, h, w)`` cosines of ``emb (h, w, D)`` against ``text (K, D)`` unit rows, optionally resized."""
    x = F.normalize(torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)), dim=-1)
    s = torch.einsum("hwd,kd->khw", x, text)
    if hw is not None and tuple(s.shape[1:]) != tuple(hw):
        s = F.interpolate(s[None], size=tuple(hw), mode="bilinear", align_corners=False)[0]
    return s


def prior_bias(records: Sequence, embed: Callable, teacher: Callable, text: np.ndarray, *,
               max_pixels: int = 400_000, seed: int = 0) -> dict:
    """Bias of ``embed`` (the student: ``record -> (h, w, D)``) so its class frequencies over ``records`` equal
    those of ``teacher`` (``record -> (h', w', D)``, the cached dense CLIP features), both against ``text (K, D)``.

    Both are counted on the student's grid (the teacher's scores resized onto it, bilinear). At most
    ``max_pixels`` student score rows are kept (a seeded random subset) for the fit.
    Returns ``{"bias": (K,) float32 ndarray, "teacher_freq", "student_freq", "matched_freq": (K,) lists,
    "n_images"}``."""
    t = F.normalize(torch.as_tensor(np.asarray(text, np.float32)), dim=1)
    k = t.shape[0]
    rows, t_count = [], torch.zeros(k, dtype=torch.float64)
    for rec in records:
        s = _scores(embed(rec), t)
        t_count += torch.bincount(_scores(teacher(rec), t, s.shape[1:]).argmax(0).flatten(), minlength=k).double()
        rows.append(s.flatten(1).t())
    if not rows:
        raise ValueError("prior matching needs at least one training image")
    scores = torch.cat(rows)
    if scores.shape[0] > max_pixels:
        g = torch.Generator().manual_seed(seed)
        scores = scores[torch.randperm(scores.shape[0], generator=g)[:max_pixels]]
    target = t_count / t_count.sum().clamp_min(1)
    bias = fit_prior_bias(scores, target)
    return {"bias": bias.numpy(), "teacher_freq": target.tolist(),
            "student_freq": class_frequencies(scores.argmax(1), k).tolist(),
            "matched_freq": class_frequencies((scores + bias).argmax(1), k).tolist(), "n_images": len(rows)}
