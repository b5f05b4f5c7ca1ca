"""Per-region recolouring of training views: what the teacher ignores about colour, imposed segment by segment.

The global photometric views (``train.augment.photometric``) transform a whole view at once, so they keep how the
colours and luminances of its regions compare: "the darker stripes are this class" or "the bluer region is that
one" survives every such view. Where colour or luminance is tied to the class in the training images but the
teacher ignores it (it reads texture), a student can learn that cue instead of the one its teacher reads, and it
fails wherever the tie breaks. Recolouring the superpixels of the view
(:func:`clips4.pipeline.regions.recolour_regions`: the regions trade their mean colours and texture contrasts by a
random permutation, each keeping its grey-level pattern; the segments stage's labels carried through the crop)
leaves no colour or luminance, absolute or relative, that the student could read a label from: the view's target
is still the teacher on the untouched image.

``train.augment.regions``: ``auto`` imposes it when the teacher is measured to be invariant to it
(``clips4.pipeline.invariances`` family ``local_recolour``: the cells of a random partition recoloured alike), so a
teacher that reads colour keeps its student reading colour; ``imposed``: always; ``none``: never (the paper).
Every view is recoloured so; its other photometric transforms (whole-view) follow.
"""
from __future__ import annotations

import numpy as np
import torch

from clips4.pipeline.grid import resize_nearest
from clips4.pipeline.regions import recolour_regions

__all__ = ["apply_regions", "paste_box", "paste_regions"]


def apply_regions(img: torch.Tensor, labels, g: torch.Generator) -> torch.Tensor:
    """``img (3,S,S) float [0,1]`` -> same, every region of ``labels (S,S)`` recoloured with its own draw (one
    seed drawn from ``g``)."""
    lab = np.asarray(labels)
    if lab.shape != tuple(img.shape[1:]):
        raise ValueError(f"labels {lab.shape} do not match the view {tuple(img.shape[1:])}")
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g).item()))
    out = recolour_regions(img.permute(1, 2, 0).numpy(), lab, rng)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def _fit(a: tuple, b: tuple) -> tuple:
    """``b``'s image, labels and features resized to ``a``'s (bilinear image, nearest labels so no new ids, the
    feature cell nearest each of ``a``'s cell centres)."""
    import cv2

    lab_a, feat_a = a[1], a[2]
    img_b, lab_b, feat_b = b
    H, W = lab_a.shape
    h, w = feat_a.shape[:2]
    img_b = cv2.resize(np.ascontiguousarray(img_b), (W, H), interpolation=cv2.INTER_LINEAR)
    lab_b = cv2.resize(np.ascontiguousarray(lab_b, np.int32), (W, H), interpolation=cv2.INTER_NEAREST)
    return img_b, lab_b, resize_nearest(feat_b, (h, w))


def _composite(a: tuple, b: tuple, mask: np.ndarray) -> tuple:
    """``a`` with ``b`` (already fitted to it) where ``mask (H,W)`` is set: ``b``'s pixels, its segment ids offset
    past ``a``'s (negative ids stay negative: ignored), and ``b``'s teacher features on the feature cells the mask
    covers more than half of — the target of a pasted pixel is what the teacher saw in its own image."""
    import cv2

    img_a, lab_a, feat_a = a
    img_b, lab_b, feat_b = b
    h, w = feat_a.shape[:2]
    offset = int(max(lab_a.max(), -1)) + 1
    image = np.where(mask[..., None], img_b, img_a)
    labels = np.where(mask, np.where(lab_b >= 0, lab_b.astype(np.int64) + offset, lab_b), lab_a)
    cover = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
    feats = np.where(cover[..., None], feat_b, feat_a).astype(feat_a.dtype)
    return image, labels.astype(lab_a.dtype if lab_a.dtype.kind == "i" else np.int64), feats


def paste_regions(a: tuple, b: tuple, rng: np.random.Generator, share: float = 0.5) -> tuple:
    """Superpixels of image ``b`` pasted over image ``a`` (ClassMix-style, on the segments stage's regions).

    ``a``, ``b``: ``(image (H,W,3) uint8, labels (H,W) int, feats (h,w,D))`` — ``b`` of any size, resized to
    ``a``'s. Each region of ``b`` is taken with probability ``share``. Returns the same triple for the composite.
    """
    b = _fit(a, b)
    ids = np.unique(b[1][b[1] >= 0])
    take = ids[rng.random(len(ids)) < share]
    if not len(take):
        return a
    return _composite(a, b, np.isin(b[1], take))


def paste_box(a: tuple, b: tuple, rng: np.random.Generator, area: float = 0.5) -> tuple:
    """A box of image ``b`` pasted over image ``a`` (CutMix with the teacher's features as the targets).

    Unlike :func:`paste_regions` it needs no segments (where the segments stage finds one region per image, a
    box still puts classes beside neighbours they never meet in the data). The box covers ``area`` of the image,
    its aspect drawn log-uniformly in 1/2 .. 2, its place uniformly; ``b`` is resized to ``a`` first, so the box
    shows the same part of ``b``. Triples as in :func:`paste_regions`.
    """
    b = _fit(a, b)
    H, W = a[1].shape
    aspect = float(np.exp(rng.uniform(-np.log(2), np.log(2))))
    bh = int(np.clip(round(np.sqrt(area * H * W * aspect)), 1, H))
    bw = int(np.clip(round(area * H * W / bh), 1, W))
    y0, x0 = int(rng.integers(0, H - bh + 1)), int(rng.integers(0, W - bw + 1))
    mask = np.zeros((H, W), bool)
    mask[y0:y0 + bh, x0:x0 + bw] = True
    return _composite(a, b, mask)
