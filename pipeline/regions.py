"""Per-region recolouring: the regions of an image trade their colours, brightness and texture contrast at random,
each keeping its own grey-level pattern.

Used twice: ``clips4.trainer.regions`` applies it to the superpixels of a training view
(``train.augment.regions``), and ``clips4.pipeline.invariances`` measures the teacher's invariance to it (family
``local_recolour``, on the cells of a random partition), so that it is imposed only on a student whose teacher
ignores colour and luminance. With ``π`` a random permutation of the regions of an ``(H,W,3)`` image in
``[0, 1]``, region ``r`` becomes ``m_π(r) + (y - mean_r(y)) · (σ_π(r) / σ_r) · m_π(r) / mean(m_π(r))``: the mean
colour ``m`` and grey-level contrast ``σ`` of region ``π(r)`` (its texture tinted like it), and the grey-level
pattern ``y - mean_r(y)`` of ``r``. Which colour and brightness a region wears, and how they compare with the
other regions', then says nothing of what it is; the image keeps its own colours (the network's input statistics
stay those of real images). numpy only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["recolour_regions"]


def recolour_regions(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``img (H,W,3) float in [0,1]`` -> same, the regions (each id of ``labels (H,W)``, negative ids included)
    recoloured by a random permutation drawn from ``rng`` (see the module docstring); clipped to ``[0, 1]``."""
    img = np.asarray(img, np.float32)
    labels = np.asarray(labels)
    if labels.shape != img.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {img.shape[:2]}")
    ids, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(labels.shape)
    n = len(ids)
    grey = img.mean(-1)
    count = np.maximum(np.bincount(inv.ravel(), minlength=n), 1)
    mean = np.stack([np.bincount(inv.ravel(), img[..., k].ravel(), n) for k in range(3)], 1) / count[:, None]
    gmean = np.bincount(inv.ravel(), grey.ravel(), n) / count
    gvar = np.bincount(inv.ravel(), (grey - gmean[inv]).ravel() ** 2, n) / count
    sd = np.sqrt(np.maximum(gvar, 1e-8))
    perm = rng.permutation(n)
    tint = mean / np.maximum(mean.mean(1, keepdims=True), 1e-3)
    dev = (grey - gmean[inv]) * (sd[perm] / sd)[inv]
    out = mean[perm][inv] + dev[..., None] * tint[perm][inv]
    return np.clip(out, 0.0, 1.0).astype(np.float32)
