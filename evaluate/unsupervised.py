"""Unsupervised semantic segmentation read-outs (paper section 4.4): k-NN segment retrieval (SegSort style)
and a linear classifier on frozen pixel embeddings (MaskContrast style), both scored with mIoU.

Conventions:

* a segment's embedding is the mean of its pixel embeddings, L2-normalised (:func:`segment_embeddings`);
* a training segment's label is the majority GT label over its non-ignored pixels (:func:`segment_majority_labels`;
  segments with no valid pixel get ``ignore_index`` and are dropped from the k-NN database);
* k-NN: cosine similarity (FAISS ``IndexFlatIP`` on normalised vectors, exact); each query segment takes the
  majority label of its ``k`` nearest training segments; ties go to the tied label with the largest summed
  similarity (then the smaller id);
* linear classifier: multinomial logistic regression (``torch.nn.Linear`` + cross-entropy, AdamW, a few epochs)
  on L2-normalised pixel embeddings; at test time the ``(K, h, w)`` logits are resized bilinearly to the GT size
  and arg-maxed (MaskContrast's upsampled-logit evaluation).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from clips4.evaluate.metrics import ConfusionMatrix

__all__ = [
    "segment_embeddings",
    "segment_majority_labels",
    "knn_classify",
    "knn_segmentation",
    "train_linear_classifier",
    "linear_logits",
    "linear_segmentation",
    "resize_nearest",
]


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map (pixel centres), e.g. segments/GT onto an embedding grid."""
    labels = np.asarray(labels)
    H, W = labels.shape[:2]
    h, w = size
    ys = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    return labels[ys[:, None], xs[None, :]]


def segment_embeddings(pixel_emb: np.ndarray, segments: np.ndarray, n_segments: int | None = None) -> np.ndarray:
    """Mean pixel embedding per segment id, L2-normalised -> ``(n_segments, D)`` float32.

    ``pixel_emb (h, w, D)``; ``segments (H, W)`` ids ``0..n-1`` (negative = unassigned) are resized (nearest)
    to ``(h, w)`` if the sizes differ. Segments without any cell get a zero vector."""
    pixel_emb = np.asarray(pixel_emb, dtype=np.float32)
    segments = np.asarray(segments)
    if segments.shape != pixel_emb.shape[:2]:
        segments = resize_nearest(segments, pixel_emb.shape[:2])
    n = int(segments.max()) + 1 if n_segments is None else n_segments
    seg = segments.reshape(-1)
    emb = pixel_emb.reshape(-1, pixel_emb.shape[-1])
    ok = (seg >= 0) & (seg < n)
    out = np.zeros((n, emb.shape[1]), np.float64)
    np.add.at(out, seg[ok], emb[ok])
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norm, 1e-12)).astype(np.float32)


def segment_majority_labels(
    segments: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255, n_segments: int | None = None
) -> np.ndarray:
    """Majority GT label per segment (ignored pixels skipped; ``ignore_index`` if none) -> ``(n,) int64``."""
    segments = np.asarray(segments).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if segments.shape != gt.shape:
        raise ValueError("segments and gt must have the same shape")
    n = int(segments.max()) + 1 if n_segments is None else n_segments
    ok = (segments >= 0) & (segments < n) & (gt >= 0) & (gt < num_classes) & (gt != ignore_index)
    counts = np.bincount(segments[ok] * num_classes + gt[ok], minlength=n * num_classes).reshape(n, num_classes)
    labels = counts.argmax(1).astype(np.int64)
    labels[counts.sum(1) == 0] = ignore_index
    return labels


def knn_classify(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    query_emb: np.ndarray,
    k: int = 10,
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """Majority vote of the ``k`` most cosine-similar training vectors (FAISS exact inner product)."""
    import faiss

    train_labels = np.asarray(train_labels).astype(np.int64)
    keep = train_labels != ignore_index
    xb = np.ascontiguousarray(train_emb[keep], dtype=np.float32)
    yb = train_labels[keep]
    if len(xb) == 0:
        raise ValueError("no labelled training vectors")
    xq = np.ascontiguousarray(query_emb, dtype=np.float32)
    faiss.normalize_L2(xb)
    faiss.normalize_L2(xq)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    k = min(k, len(xb))
    sims, idx = index.search(xq, k)
    nc = int(num_classes if num_classes is not None else yb.max() + 1)
    votes = np.zeros((len(xq), nc), np.float64)
    simsum = np.zeros((len(xq), nc), np.float64)
    rows = np.repeat(np.arange(len(xq)), k)
    lab = yb[idx.reshape(-1)]
    np.add.at(votes, (rows, lab), 1.0)
    np.add.at(simsum, (rows, lab), sims.reshape(-1))
    # primary key: vote count; tie-break: summed similarity (scaled below one vote), then smaller id (argmax)
    score = votes + 0.5 * (simsum - simsum.min()) / max(np.ptp(simsum), 1e-12) / (k + 1)
    return score.argmax(1).astype(np.int64)


def knn_segmentation(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    images: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    k: int = 10,
    ignore_index: int = 255,
    class_names=None,
) -> dict:
    """k-NN segment classification -> mIoU.

    ``images`` yields ``(segment_emb (n, D), segments (H, W) ids 0..n-1, gt (H, W))`` per validation image; each
    segment's predicted label paints its pixels (unassigned pixels, id < 0, predict ``ignore_index`` = wrong)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    n_img = 0
    for seg_emb, segments, gt in images:
        lab = knn_classify(train_emb, train_labels, seg_emb, k, num_classes, ignore_index)
        segments = np.asarray(segments).astype(np.int64)
        pred = np.full(segments.shape, ignore_index, np.int64)
        ok = (segments >= 0) & (segments < len(lab))
        pred[ok] = lab[segments[ok]]
        cm.update(pred, gt)
        n_img += 1
    res = cm.to_dict(class_names)
    res.update({"method": "knn", "k": k, "n_images": n_img})
    return res


def train_linear_classifier(
    X: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 5,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 4096,
    ignore_index: int = 255,
    seed: int = 0,
    device: str | None = None,
) -> torch.nn.Linear:
    """Logistic regression on L2-normalised features ``X (N, D)`` with labels ``y (N,)`` (``ignore_index`` skipped)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(seed)
    X = F.normalize(torch.as_tensor(np.asarray(X), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    keep = (y != ignore_index) & (y >= 0) & (y < num_classes)
    X, y = X[keep], y[keep]
    torch.manual_seed(seed)
    model = torch.nn.Linear(X.shape[1], num_classes).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * ((len(X) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), batch_size):
            b = perm[s : s + batch_size]
            loss = F.cross_entropy(model(X[b].to(dev)), y[b].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def linear_logits(model: torch.nn.Linear, pixel_emb: np.ndarray, out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(h, w, D)`` embeddings -> ``(K, H, W)`` logits (bilinear resize to ``out_size``)."""
    dev = next(model.parameters()).device
    x = F.normalize(torch.as_tensor(np.asarray(pixel_emb), dtype=torch.float32, device=dev), dim=-1)
    with torch.no_grad():
        logits = model(x).permute(2, 0, 1)
        if out_size is not None and tuple(out_size) != tuple(logits.shape[1:]):
            logits = F.interpolate(logits[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return logits


def linear_segmentation(
    model: torch.nn.Linear,
    images: Iterable[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    ignore_index: int = 255,
    class_names=None,
) -> dict:
    """Score a trained linear classifier: ``images`` yields ``(pixel_emb (h, w, D), gt (H, W))``."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    n_img = 0
    for emb, gt in images:
        pred = linear_logits(model, emb, np.asarray(gt).shape[:2]).argmax(0).cpu().numpy()
        cm.update(pred, gt)
        n_img += 1
    res = cm.to_dict(class_names)
    res.update({"method": "linear", "n_images": n_img})
    return res
