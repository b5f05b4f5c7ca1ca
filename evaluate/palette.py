"""Colour palettes and indexed-PNG helpers shared by the evaluation modules.

The palette is the standard PASCAL VOC colour map (the one the VOC devkit, mmseg and the DAVIS 2017
toolkit use for indexed PNGs): colour ``i`` spreads the bits of ``i`` over the high bits of R, G and B.
Id 0 is black, id 1 dark red (128, 0, 0), id 2 dark green, ... and id 255 (ignore) is (224, 224, 192).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["voc_palette", "figure_palette", "DISTINCT_COLOURS", "VOID_COLOUR", "palette_list", "save_indexed_png",
           "colorize", "overlay", "legend_entries"]

#: colours of figures and overlays (indexed PNGs of evaluations keep the VOC map): 32 colours picked greedily for
#: the largest smallest CIELAB distance, none near black, white or :data:`VOID_COLOUR`. Any two differ by ΔE ≥ 27,
#: the first 21 by ΔE ≥ 33 (the VOC map has pairs at 8.8: bus / motorbike, 11.3: boat / dog, 12.2: bicycle / cow).
DISTINCT_COLOURS = np.array([
    (240, 0, 0), (0, 0, 240), (0, 240, 0), (0, 192, 240), (96, 96, 0), (240, 96, 192), (240, 192, 192),
    (0, 240, 192), (240, 192, 0), (144, 48, 48), (48, 96, 192), (0, 144, 0), (48, 96, 96), (240, 0, 240),
    (240, 0, 96), (192, 96, 0), (96, 48, 192), (144, 96, 144), (144, 192, 144), (144, 240, 96), (144, 0, 96),
    (0, 96, 48), (192, 144, 96), (192, 144, 240), (192, 192, 240), (192, 192, 96), (0, 96, 144), (96, 240, 240),
    (144, 144, 144), (240, 144, 192), (240, 96, 96), (144, 0, 144),
], dtype=np.uint8)
#: pixels that are not scored (id 255: VOC's object outlines and ambiguous regions), as the VOC map draws them
VOID_COLOUR = (224, 224, 192)


def voc_palette(n: int = 256) -> np.ndarray:
    """``(n, 3) uint8`` PASCAL VOC colour map (also the DAVIS palette)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def figure_palette(n: int = 256, ignore_index: int | None = 255) -> np.ndarray:
    """``(n, 3) uint8`` colours for figures: :data:`DISTINCT_COLOURS` first, then the VOC map's; ``ignore_index``
    gets :data:`VOID_COLOUR`."""
    pal = voc_palette(n)
    k = min(n, len(DISTINCT_COLOURS))
    pal[:k] = DISTINCT_COLOURS[:k]
    if ignore_index is not None and 0 <= ignore_index < n:
        pal[ignore_index] = VOID_COLOUR
    return pal


def palette_list(palette: np.ndarray | None = None) -> list[int]:
    """Flat ``[r0, g0, b0, r1, ...]`` list of 768 values for ``PIL.Image.putpalette``."""
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: min(256, len(pal))] = pal[:256]
    return full.reshape(-1).tolist()


def save_indexed_png(path: str | Path, labels: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """Write ``labels`` (H, W ints in 0..255) as a palette ('P' mode) PNG; pixel values are the ids."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"label ids must be in 0..255 for an indexed PNG, got {labels.min()}..{labels.max()}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette_list(palette))
    img.save(path)
    return path


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """``(H, W)`` ids -> ``(H, W, 3) uint8`` colours (ids are taken modulo the palette length)."""
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    labels = np.asarray(labels).astype(np.int64)
    return pal[np.mod(labels, len(pal))]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray | None = None, alpha: float = 0.5,
            ignore_index: int = 255, void: tuple[int, int, int] | None = None) -> np.ndarray:
    """``(H, W, 3) uint8`` image blended with the colours of ``(H, W)`` labels. Ignored pixels keep the image, or
    are painted in ``void`` (e.g. :data:`VOID_COLOUR`, so ground truth shows what is not scored)."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    labels = np.asarray(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} sizes differ")
    col = colorize(labels, palette).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + col * alpha
    out[labels == ignore_index] = image[labels == ignore_index] if void is None else np.asarray(void, np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def legend_entries(label_maps, class_names=None, palette: np.ndarray | None = None, ignore_index: int = 255,
                   limit: int | None = None) -> list[tuple[int, str, tuple[int, int, int]]]:
    """``[(id, name, (r, g, b))]`` for the ids present in any of ``label_maps``, largest total area first (at
    most ``limit``); ids without a name are shown as their number."""
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    counts: dict[int, int] = {}
    for lab in label_maps:
        ids, n = np.unique(np.asarray(lab).astype(np.int64), return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            if i != ignore_index:
                counts[i] = counts.get(i, 0) + c
    order = sorted(counts, key=lambda i: (-counts[i], i))[:limit]
    names = list(class_names) if class_names is not None else []
    return [(i, names[i] if 0 <= i < len(names) else str(i), tuple(int(v) for v in pal[i % len(pal)])) for i in order]
