"""How a trained pixel-embedding network is run on whole images, and how its embeddings are scored against class
text embeddings: shared by training (the class calibration written into ``final.pt``) and every evaluation.

- :func:`model_embedder`: ``image (H, W, 3) uint8 -> (h, w, D) float32`` (output stride 8; sliding windows of
  :data:`MAX_SIDE` for large images);
- :func:`similarity_logits`: ``(K, H, W)`` cosines of pixel embeddings to ``(K, D)`` text embeddings.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MAX_SIDE", "model_embedder", "similarity_logits", "sliding_window_embed"]

#: images whose long side exceeds this are embedded by sliding windows of this size (2/3 overlap stride)
MAX_SIDE = 640


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


def model_embedder(model: torch.nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """``image (H, W, 3) uint8 -> (h, w, D) float32`` from a trained network (output stride 8)."""
    from clips4.trainer.augment import normalize_image

    @torch.inference_mode()
    def one(img: np.ndarray) -> np.ndarray:
        x = normalize_image(img)[None].to(device)
        if min(img.shape[:2]) < 16:  # the network needs a few pixels per output cell
            x = torch.nn.functional.interpolate(x, size=(max(16, img.shape[0]), max(16, img.shape[1])), mode="bilinear")
        return model(x)[0].permute(1, 2, 0).float().cpu().numpy()

    def embed(img: np.ndarray) -> np.ndarray:
        if max(img.shape[:2]) <= MAX_SIDE:
            return one(img)
        e = sliding_window_embed(one, img, MAX_SIDE, MAX_SIDE * 2 // 3)
        return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    return embed


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
