"""Pixel <-> feature-grid geometry: the one rule every stage, the trainer and the evaluations use.

The backend alignment contract (:class:`clips4.pipeline.backends.VisionLanguageBackend`): an ``(h, w)`` grid over
an ``(H, W)`` image has cell ``i`` covering rows ``[i*H/h, (i+1)*H/h)``. A pixel row ``y`` covers ``[y, y+1)``;
it belongs to the cell that holds its **centre** ``y + 0.5``, i.e. ``floor((y + 0.5) * h / H)`` (computed in
integers so no rounding can move a pixel). The same rule resamples any id map between two sizes
(nearest, by centres), in either direction.
"""
from __future__ import annotations

import numpy as np

__all__ = ["centre_index", "pixel_to_cell", "resize_nearest"]


def centre_index(n_bins: int, n_items: int) -> np.ndarray:
    """``(n_items,) int64``: a length cut into ``n_items`` unit items and, independently, into ``n_bins`` equal
    bins; entry ``i`` is the bin that holds item ``i``'s centre, ``floor((i + 0.5) * n_bins / n_items)``.
    ``centre_index(h, H)[y]`` is the grid cell of pixel row ``y``."""
    if n_bins < 1 or n_items < 1:
        raise ValueError(f"sizes must be >= 1, got {n_bins} and {n_items}")
    return ((2 * np.arange(n_items, dtype=np.int64) + 1) * n_bins) // (2 * n_items)


def pixel_to_cell(H: int, W: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid row ``(H,) int64`` of every image row and grid column ``(W,) int64`` of every image column."""
    return centre_index(h, H), centre_index(w, W)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resampling of an id map ``(H, W, ...)`` to ``size = (h, w)`` by bin centres (the rule above):
    grid -> pixels gives every pixel its cell's value; pixels -> grid gives every cell its centre pixel's value."""
    labels = np.asarray(labels)
    H, W = labels.shape[:2]
    h, w = int(size[0]), int(size[1])
    if (H, W) == (h, w):
        return labels
    ys, xs = centre_index(H, h), centre_index(W, w)
    return labels[ys[:, None], xs[None, :]]
