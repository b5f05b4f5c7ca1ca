"""Language-driven semantic segmentation (paper section 4.3): pixels take the class whose text embedding is
the most cosine-similar to the pixel embedding.

Choices (documented conventions):

* **logit upsampling** (the common convention, MaskCLIP / mmseg ``resize(seg_logit)``): cosine similarities are
  computed at the embedding resolution, the ``(K, h, w)`` score map is resized bilinearly
  (``align_corners=False``) to the image size, then arg-maxed. ``upsample="embeddings"`` instead resizes the
  embeddings and re-normalises them before the cosine (more memory, nearly identical results).
* **VOC background**: ``mode 21`` = 21 classes with a "background" text prompt as class 0 (MaskCLIP / mmseg
  convention; the background class competes like any other); ``mode 20`` = the 20 object classes only, GT
  background pixels (id 0) become ``ignore_index`` and GT ids 1..20 become 0..19 (see :func:`voc_gt_transform`),
  predicted PNGs are written with ids + 1 so they keep the dataset's ids.
* Sliding-window inference (:func:`sliding_window_embed`) averages the overlapping windows' embeddings
  (mmseg ``slide_inference`` grid: windows start at multiples of ``stride``, the last one is aligned to the
  border).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clips4.evaluate.metrics import ConfusionMatrix
from clips4.evaluate.palette import save_indexed_png
from clips4.pipeline.safepath import output_path

__all__ = [
    "predict_labels",
    "similarity_logits",
    "sliding_window_embed",
    "voc_gt_transform",
    "voc_text_subset",
    "evaluate_language",
]


def _to_hwd(pixel_emb: np.ndarray | torch.Tensor, dim: int, layout: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(pixel_emb) if not isinstance(pixel_emb, torch.Tensor) else pixel_emb)
    if x.ndim != 3:
        raise ValueError(f"pixel embeddings must be 3-D (D,h,w) or (h,w,D), got {tuple(x.shape)}")
    if layout == "auto":
        if x.shape[-1] == dim:
            layout = "hwd"
        elif x.shape[0] == dim:
            layout = "dhw"
        else:
            raise ValueError(f"no axis of pixel embeddings {tuple(x.shape)} matches text dim {dim}")
    if layout == "dhw":
        x = x.permute(1, 2, 0)
    elif layout != "hwd":
        raise ValueError(f"layout must be auto, hwd or dhw, got {layout!r}")
    return x.float()


def similarity_logits(
    pixel_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    out_size: tuple[int, int] | None = None,
    *,
    layout: str = "auto",
    upsample: str = "logits",
) -> torch.Tensor:
    """``(K, H, W)`` cosine similarities (at ``out_size`` if given, else at the embedding resolution)."""
    t = torch.as_tensor(np.asarray(text_emb) if not isinstance(text_emb, torch.Tensor) else text_emb).float()
    if t.ndim != 2:
        raise ValueError(f"text embeddings must be (K, D), got {tuple(t.shape)}")
    x = _to_hwd(pixel_emb, t.shape[1], layout).to(t.device)
    t = F.normalize(t, dim=1)
    if upsample == "embeddings" and out_size is not None and tuple(out_size) != tuple(x.shape[:2]):
        x = F.interpolate(x.permute(2, 0, 1)[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
        x = x.permute(1, 2, 0)
        out_size = None
    elif upsample not in ("logits", "embeddings"):
        raise ValueError(f"upsample must be 'logits' or 'embeddings', got {upsample!r}")
    x = F.normalize(x, dim=-1)
    logits = torch.einsum("hwd,kd->khw", x, t)
    if out_size is not None and tuple(out_size) != tuple(logits.shape[1:]):
        logits = F.interpolate(logits[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return logits


def predict_labels(
    pixel_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    out_size: tuple[int, int] | None = None,
    *,
    layout: str = "auto",
    upsample: str = "logits",
) -> np.ndarray:
    """Arg-max over cosine similarity to ``text_emb`` (K, D) -> ``(H, W) int64`` class ids ``0..K-1``.

    ``pixel_emb`` is ``(h, w, D)`` or ``(D, h, w)`` (``layout="auto"`` picks the axis whose size is D; pass
    ``"hwd"`` / ``"dhw"`` when ambiguous). ``out_size=(H, W)`` resizes bilinearly (logits by default)."""
    d_text = np.shape(text_emb)[-1]
    if d_text not in np.shape(pixel_emb):  # same message whichever source; no numpy/torch shape error
        from clips4.evaluate.compat import check_width

        dims = np.shape(pixel_emb)
        check_width(dims[-1] if layout != "dhw" else dims[0], d_text, source="the pixel embeddings",
                    against="the text embeddings")
    with torch.no_grad():
        logits = similarity_logits(pixel_emb, text_emb, out_size, layout=layout, upsample=upsample)
        return logits.argmax(0).cpu().numpy().astype(np.int64)


def sliding_window_embed(
    embed_fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
) -> np.ndarray:
    """Embed a large image window by window and average the overlaps.

    ``embed_fn(crop (wh, ww, 3)) -> (h', w', D)`` at any fixed downsampling; the output grid keeps the scale
    of the first window (``round(H * h'/wh), round(W * w'/ww)``) and each window's embeddings are resized
    (bilinear) onto the grid cells it covers. Returns ``(Hg, Wg, D) float32`` (not re-normalised)."""
    image = np.asarray(image)
    H, W = image.shape[:2]
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    wh, ww = min(wh, H), min(ww, W)
    ny = max(H - wh + sh - 1, 0) // sh + 1
    nx = max(W - ww + sw - 1, 0) // sw + 1
    acc = cnt = None
    sy = sx = None
    for iy in range(ny):
        for ix in range(nx):
            y2, x2 = min(iy * sh + wh, H), min(ix * sw + ww, W)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            e = np.asarray(embed_fn(image[y1:y2, x1:x2]), dtype=np.float32)
            if e.ndim != 3:
                raise ValueError(f"embed_fn must return (h, w, D), got {e.shape}")
            if acc is None:
                sy, sx = e.shape[0] / (y2 - y1), e.shape[1] / (x2 - x1)
                Hg, Wg = max(1, round(H * sy)), max(1, round(W * sx))
                acc = np.zeros((Hg, Wg, e.shape[2]), np.float64)
                cnt = np.zeros((Hg, Wg, 1), np.float64)
            gy1, gy2 = round(y1 * sy), max(round(y2 * sy), round(y1 * sy) + 1)
            gx1, gx2 = round(x1 * sx), max(round(x2 * sx), round(x1 * sx) + 1)
            gy2, gx2 = min(gy2, acc.shape[0]), min(gx2, acc.shape[1])
            t = torch.from_numpy(e).permute(2, 0, 1)[None]
            if t.shape[-2:] != (gy2 - gy1, gx2 - gx1):
                t = F.interpolate(t, size=(gy2 - gy1, gx2 - gx1), mode="bilinear", align_corners=False)
            acc[gy1:gy2, gx1:gx2] += t[0].permute(1, 2, 0).numpy()
            cnt[gy1:gy2, gx1:gx2] += 1
    return (acc / np.maximum(cnt, 1)).astype(np.float32)


def voc_gt_transform(gt: np.ndarray, mode: int | str = 21, ignore_index: int = 255) -> np.ndarray:
    """VOC ground truth for the chosen mode: 21 -> unchanged; 20 -> background (0) ignored, ids 1..20 -> 0..19."""
    mode = int(mode)
    gt = np.asarray(gt).astype(np.int64)
    if mode == 21:
        return gt
    if mode != 20:
        raise ValueError(f"VOC mode must be 20 or 21, got {mode}")
    out = gt - 1
    out[(gt == 0) | (gt == ignore_index)] = ignore_index
    return out


def voc_text_subset(class_names: Sequence[str], text_emb: np.ndarray, mode: int | str = 21):
    """(names, text embeddings) for the mode, given the 21 VOC names/embeddings with background first."""
    if int(mode) == 21:
        return list(class_names), text_emb
    if int(mode) == 20:
        return list(class_names)[1:], np.asarray(text_emb)[1:]
    raise ValueError(f"VOC mode must be 20 or 21, got {mode}")


def evaluate_language(
    records: Iterable,
    gt_loader: Callable[[object], np.ndarray],
    embed_source: Callable[[object], np.ndarray],
    text_emb: np.ndarray,
    class_names: Sequence[str],
    ignore_index: int = 255,
    save_predictions: str | Path | None = None,
    *,
    gt_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    save_offset: int = 0,
    upsample: str = "logits",
    confusion: ConfusionMatrix | None = None,
) -> dict:
    """Language-driven segmentation over ``records`` -> mIoU etc. (:meth:`ConfusionMatrix.to_dict`).

    ``gt_loader(record) -> (H, W)`` ids (255 ignore), ``embed_source(record) -> (h, w, D)`` pixel embeddings;
    ``text_emb (K, D)`` rows match ``class_names``. ``gt_transform`` maps GT ids into ``0..K-1`` (e.g.
    ``lambda g: voc_gt_transform(g, 20)``) and ``save_offset`` is added to predicted ids before writing PNGs
    (1 in VOC mode 20) so saved ids equal the dataset's GT ids. PNGs go to ``<save_predictions>/<image_id>.png``.
    Pass ``confusion`` to accumulate into an existing matrix (e.g. one per worker, merged later)."""
    cm = confusion if confusion is not None else ConfusionMatrix(len(class_names), ignore_index)
    if cm.num_classes != len(class_names):
        raise ValueError("confusion matrix size does not match class_names")
    if len(np.asarray(text_emb)) != len(class_names):
        raise ValueError(f"{len(np.asarray(text_emb))} text embeddings for {len(class_names)} class names")
    out_dir = Path(save_predictions) if save_predictions is not None else None
    n = 0
    for rec in records:
        gt = np.asarray(gt_loader(rec))
        if gt_transform is not None:
            gt = gt_transform(gt)
        emb = embed_source(rec)
        pred = predict_labels(emb, text_emb, gt.shape[:2], layout="hwd", upsample=upsample)
        cm.update(pred, gt)
        if out_dir is not None:
            image_id = getattr(rec, "image_id", None) or str(n)
            save_indexed_png(output_path(out_dir, f"{image_id}.png", what="prediction"), pred + save_offset)
        n += 1
    res = cm.to_dict(class_names)
    res["n_images"] = n
    res["upsample"] = upsample
    return res
