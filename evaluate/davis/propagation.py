"""DAVIS 2017 instance mask propagation (paper section 4.5).

Propagation protocol -- the label propagation of the contrastive random walk (Jabri et al. 2020,
``ajabri/videowalk`` ``code/test.py`` + ``code/utils/test_utils.py`` + ``code/data/vos.py``), reproduced:

* every frame is embedded to an ``(h, w, D)`` L2-normalised feature grid by ``embed(frame)``;
* the first frame's annotation is turned into per-object one-hot maps (ids ``0..K``, ``K`` = max id of the first
  annotation, 255 -> 0 as the toolkit does) and resized to the feature grid with ``cv2.resize`` bilinear
  (``INTER_LINEAR``, what ``vos.py`` ends up calling) -> soft labels that sum to 1;
* the video is conceptually padded at the front with ``n_context`` copies of frame 0 (``vos.py make_paths``);
  target frame ``t >= 1`` uses as context (a) the first frame ("long memory", **no** spatial restriction) and
  (b) the ``n_context`` preceding padded positions, i.e. real frames ``max(0, t - n_context) .. t - 1`` with frame
  0 repeated ``n_context - t + 1`` times while ``t <= n_context`` -- each occurrence is a separate set of
  candidate nodes, exactly like the reference's concatenated key tensor;
* short-context nodes are restricted to those whose grid distance to the query cell is ``< radius``
  (``MaskedAttention``: Euclidean distance on the feature grid, strict inequality);
* affinity ``A = <q, k> / temperature`` over all allowed context nodes together; the ``topk`` largest are kept
  and soft-maxed; the target's label map is the weighted sum of those nodes' label vectors;
* predicted frames keep their *soft* label maps (no argmax, no re-normalisation: ``norm_mask`` is off by default)
  and serve as context for later frames; for output a label map is resized to the frame size with
  ``cv2.resize`` (bilinear) and arg-maxed (``dump_predictions``). Frame 0 is written as the given annotation.

The top-k over the union of context nodes is computed exactly but without the dense masked affinity: the
radius restriction is evaluated as a set of grid offsets (``dy^2 + dx^2 < radius^2``), per-source top-k are
taken first and merged (the top-k of a union is the top-k of the per-part top-ks), duplicated context frames
contribute duplicated candidates.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterable

import cv2
import numpy as np
import torch

__all__ = ["EmbedFn", "color_embedding", "make_color_embedder", "labels_to_onehot", "upsample_labels", "propagate_sequence"]

EmbedFn = Callable[[np.ndarray], np.ndarray]


def color_embedding(frame: np.ndarray, stride: int = 8, color_scale: float = 0.03, xy_scale: float = 0.03) -> np.ndarray:
    """Colour + position baseline embedding ``(ceil(H/stride), ceil(W/stride), 6)`` float32, L2-normalised.

    Each grid cell: mean CIE-Lab colour (``cv2`` float conversion: L in 0..100, a/b ~ -128..127), centred
    (L - 50), times ``color_scale``; cell coordinates centred on the image, times ``xy_scale`` (in cells);
    plus a constant 1 so that, after normalisation, the dot product decreases with colour/position distance.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got {frame.shape}")
    h, w = math.ceil(frame.shape[0] / stride), math.ceil(frame.shape[1] / stride)
    lab = cv2.cvtColor(frame.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab = cv2.resize(lab, (w, h), interpolation=cv2.INTER_AREA)
    lab[..., 0] -= 50.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy -= (h - 1) / 2
    xx -= (w - 1) / 2
    feat = np.concatenate(
        [lab * color_scale, np.stack([xx, yy], -1) * xy_scale, np.ones((h, w, 1), np.float32)], axis=-1
    )
    feat /= np.linalg.norm(feat, axis=-1, keepdims=True)
    return feat.astype(np.float32)


def make_color_embedder(stride: int = 8, color_scale: float = 0.03, xy_scale: float = 0.03) -> EmbedFn:
    return lambda frame: color_embedding(frame, stride, color_scale, xy_scale)


def labels_to_onehot(labels: np.ndarray, n_labels: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` ids -> ``(h, w, n_labels)`` float32 soft labels at the feature grid (cv2 bilinear resize of
    the full-resolution one-hot, as ``vos.py``)."""
    onehot = (labels[..., None] == np.arange(n_labels)[None, None]).astype(np.float32)
    h, w = grid_hw
    out = cv2.resize(onehot, (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w, n_labels)


def upsample_labels(soft: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``(h, w, C)`` soft labels -> ``(H, W)`` ids: cv2 bilinear resize then argmax (``dump_predictions``)."""
    H, W = out_hw
    c = soft.shape[-1]
    if c <= 512:
        up = cv2.resize(np.ascontiguousarray(soft, dtype=np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
        up = up.reshape(H, W, c)
    else:  # cv2 channel limit
        up = np.concatenate(
            [cv2.resize(np.ascontiguousarray(soft[..., i : i + 512]), (W, H)).reshape(H, W, -1) for i in range(0, c, 512)],
            -1,
        )
    return np.argmax(up, axis=-1).astype(np.int64)


def _radius_offsets(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = (dy * dy + dx * dx) < radius * radius
    return np.stack([dy[keep], dx[keep]], 1)


class _Propagator:
    """Holds the first frame and the sliding short-term context; ``step(feat)`` returns soft labels."""

    def __init__(self, feat0: torch.Tensor, labels0: torch.Tensor, n_context: int, radius: float, topk: int,
                 temperature: float, query_chunk: int = 4096, dense: bool | None = None):
        # feat: (D, h, w) normalised; labels: (C, h, w)
        self.D, self.h, self.w = feat0.shape
        self.n_context, self.topk, self.temperature = n_context, topk, temperature
        self.query_chunk = query_chunk
        self.feat0, self.labels0 = feat0, labels0
        # dense similarities pay off on GPU or for wide embeddings; shifted products for the tiny colour features
        self.dense = (feat0.device.type == "cuda" or self.D > 32) if dense is None else dense
        dev = feat0.device
        h, w = self.h, self.w
        self.offsets = _radius_offsets(radius)
        self.R = int(np.abs(self.offsets).max()) if len(self.offsets) else 0
        # For each allowed offset: flat index of the source cell and -inf where it falls outside the grid.
        off = torch.as_tensor(self.offsets, device=dev)
        yy = torch.arange(h, device=dev)[None, :, None] + off[:, 0, None, None]
        xx = torch.arange(w, device=dev)[None, None, :] + off[:, 1, None, None]
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        self.src_index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(len(off), h * w)  # (O, hw)
        self.bias = torch.zeros(len(off), h * w, device=dev, dtype=feat0.dtype)
        self.bias[~inside.reshape(len(off), -1)] = -float("inf")
        # short context: padded positions (frame index, feat, labels); starts as n_context copies of frame 0
        self.context: deque = deque([(0, feat0, labels0)] * n_context, maxlen=n_context)
        self.t = 0

    def _long(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """top-k over all nodes of frame 0 (unrestricted): values (k, hw), labels (k, hw, C)."""
        D, hw = self.D, self.h * self.w
        k0 = self.feat0.reshape(D, hw)
        qf = q.reshape(D, hw)
        lab0 = self.labels0.reshape(-1, hw).T  # (hw, C)
        vals, labs = [], []
        k = min(self.topk, hw)
        for s in range(0, hw, self.query_chunk):
            a = qf[:, s : s + self.query_chunk].T @ k0  # (q, hw) cosine similarities
            v, i = torch.topk(a, k, dim=1)  # top-k of a is top-k of a / temperature
            vals.append(v.T / self.temperature)
            labs.append(lab0[i].permute(1, 0, 2))  # (k, q, C)
        return torch.cat(vals, 1), torch.cat(labs, 1)

    def _local(self, q: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor):
        """top-k over the radius-restricted nodes of each source frame.

        feats (S, D, h, w), labels (S, C, h, w) -> values (S, k, hw), labels (S, k, hw, C)."""
        S, D, h, w = feats.shape
        C, hw, n_off = labels.shape[1], h * w, len(self.offsets)
        if self.dense:
            # dense (hw x hw) similarities per source frame, then pick the allowed offsets (fast for large D)
            qf = q.reshape(D, hw)
            aff = torch.empty(S, n_off, hw, device=feats.device, dtype=feats.dtype)
            for s in range(S):
                kf = feats[s].reshape(D, hw)
                for c0 in range(0, hw, self.query_chunk):
                    a = qf[:, c0 : c0 + self.query_chunk].T @ kf  # (q, hw)
                    aff[s, :, c0 : c0 + self.query_chunk] = torch.gather(
                        a, 1, self.src_index[:, c0 : c0 + self.query_chunk].T
                    ).T
        else:
            # per-offset shifted dot products (fast for small D, e.g. the colour baseline)
            R = self.R
            fp = torch.nn.functional.pad(feats, (R, R, R, R))
            aff = torch.zeros(S, n_off, h, w, device=feats.device, dtype=feats.dtype)
            for o, (dy, dx) in enumerate(self.offsets):
                ys, xs = R + dy, R + dx
                out = aff[:, o]
                for d in range(D):
                    out.addcmul_(q[d][None], fp[:, d, ys : ys + h, xs : xs + w])
            aff = aff.reshape(S, n_off, hw)
        aff += self.bias[None]
        k = min(self.topk, n_off)
        v, oi = torch.topk(aff, k, dim=1)  # (S, k, hw)
        src = torch.gather(self.src_index[None].expand(S, -1, -1), 1, oi)  # (S, k, hw) flat source cells
        lab = labels.reshape(S, C, hw).transpose(1, 2)  # (S, hw, C)
        lab = torch.gather(lab, 1, src.reshape(S, -1, 1).expand(-1, -1, C)).reshape(S, k, hw, C)
        return v / self.temperature, lab

    def step(self, q: torch.Tensor) -> torch.Tensor:
        """Propagate to the next frame with features ``q`` (D, h, w); returns soft labels (C, h, w)."""
        lv, ll = self._long(q)
        # distinct source frames with multiplicities (frame 0 repeats while t <= n_context)
        order: dict[int, list] = {}
        for idx, feat, lab in self.context:
            if idx in order:
                order[idx][2] += 1
            else:
                order[idx] = [feat, lab, 1]
        feats = torch.stack([v[0] for v in order.values()])
        labels = torch.stack([v[1] for v in order.values()])
        mult = torch.as_tensor([v[2] for v in order.values()], device=q.device)
        sv, sl = self._local(q, feats, labels)  # (S, k, hw), (S, k, hw, C)
        S, ks, hw = sv.shape
        # duplicated context frames contribute duplicated candidates: repeat the values, map rows to labels
        rows = torch.repeat_interleave(torch.arange(S * ks, device=q.device).reshape(S, ks), mult, dim=0).flatten()
        allv = torch.cat([lv, sv.reshape(S * ks, hw)[rows]], 0)  # (k + n_context * k, hw)
        label_rows = torch.cat([torch.arange(lv.shape[0], device=q.device), rows + lv.shape[0]])
        alll = torch.cat([ll, sl.reshape(S * ks, hw, -1)], 0)  # (k + S * k, hw, C)
        k = min(self.topk, allv.shape[0])
        v, i = torch.topk(allv, k, dim=0)
        wts = torch.softmax(v, dim=0)  # (k, hw)
        gathered = torch.gather(alll, 0, label_rows[i][..., None].expand(-1, -1, alll.shape[-1]))  # (k, hw, C)
        pred = (gathered * wts[..., None]).sum(0)  # (hw, C)
        pred = pred.T.reshape(-1, self.h, self.w).contiguous()
        self.t += 1
        self.context.append((self.t, q, pred))
        return pred


def propagate_sequence(
    frames: Iterable[np.ndarray],
    first_annotation: np.ndarray,
    embed: EmbedFn,
    *,
    n_context: int = 20,
    radius: float = 12.0,
    topk: int = 10,
    temperature: float = 0.07,
    device: str | None = None,
) -> Iterable[np.ndarray]:
    """Yield ``(H, W) int64`` object-id masks for every frame (frame 0 = ``first_annotation`` itself).

    ``frames`` is consumed lazily; memory holds only frame 0 and the last ``n_context`` feature maps.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ann = np.asarray(first_annotation).astype(np.int64).copy()
    ann[ann == 255] = 0
    n_labels = int(ann.max()) + 1
    prop = None
    for t, frame in enumerate(frames):
        emb = np.asarray(embed(frame), dtype=np.float32)
        if emb.ndim != 3:
            raise ValueError(f"embedding must be (h, w, D), got {emb.shape}")
        feat = torch.from_numpy(np.ascontiguousarray(emb.transpose(2, 0, 1))).to(dev)
        feat = torch.nn.functional.normalize(feat, dim=0)
        H, W = frame.shape[:2]
        if t == 0:
            lab0 = labels_to_onehot(ann, n_labels, emb.shape[:2])
            prop = _Propagator(feat, torch.from_numpy(lab0.transpose(2, 0, 1).copy()).to(dev), n_context,
                               radius, topk, temperature)
            yield ann
            continue
        if feat.shape[1:] != (prop.h, prop.w):
            raise ValueError(f"frame {t}: feature grid {tuple(feat.shape[1:])} != first frame's {(prop.h, prop.w)}")
        soft = prop.step(feat)
        yield upsample_labels(soft.permute(1, 2, 0).cpu().numpy(), (H, W))
