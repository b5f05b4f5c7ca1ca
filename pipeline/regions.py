"""Per-region recolouring: every region of an image gets a random colour, brightness and texture contrast of its
own, its grey-level texture kept (up to gain and polarity).

Used twice: ``clips4.trainer.regions`` applies it to every superpixel of a training view
(``train.augment.regions``), and ``clips4.pipeline.invariances`` measures the teacher's invariance to it (family
``local_recolour``, on the cells of a random partition), so that it is imposed only on a student whose teacher
ignores colour and luminance. Within a region ``r`` of an ``(H,W,3)`` image in ``[0, 1]``:
``x' = t_r + s_r · (y - mean_r(y)) · c_r``, with ``y`` the grey level (mean of the channels), ``t_r`` a random
colour (each channel uniform in :data:`TARGET`), ``s_r`` a random gain (log-uniform in :data:`GAIN`, sign
random) and ``c_r`` a random tint of the texture (channels uniform in 0.5..1.5, mean 1). Whatever colour and
luminance a region had, and whatever their relation to the other regions, nothing of them is left: only the
grey-level pattern (up to gain and polarity) is. numpy only.
"""
from __future__ import annotations

import numpy as np

__all__ = ["TARGET", "GAIN", "recolour_regions"]

#: range of each channel of a region's new mean colour
TARGET = (0.15, 0.85)
#: range of a region's texture gain (log-uniform; the sign is drawn too)
GAIN = (0.5, 1.5)


def recolour_regions(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``img (H,W,3) float in [0,1]`` -> same, every region (each id of ``labels (H,W)``, negative ids included,
    in increasing order) recoloured with its own draw from ``rng``; clipped to ``[0, 1]``."""
    img = np.asarray(img, np.float32)
    labels = np.asarray(labels)
    if labels.shape != img.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {img.shape[:2]}")
    grey = img.mean(-1)
    out = np.empty_like(img)
    for r in np.unique(labels):
        m = labels == r
        dev = grey[m] - grey[m].mean()
        t = rng.uniform(*TARGET, 3)
        s = np.exp(rng.uniform(np.log(GAIN[0]), np.log(GAIN[1]))) * (1.0 if rng.uniform() < 0.5 else -1.0)
        c = rng.uniform(0.5, 1.5, 3)
        c /= c.mean()
        out[m] = t[None] + s * dev[:, None] * c[None]
    return np.clip(out, 0.0, 1.0)
