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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from clips4.evaluate.metrics import ConfusionMatrix
from clips4.evaluate.sources import EmbeddingSource, config_summary, embedding_source, torch_device, with_split
from clips4.pipeline.config import ClipFeaturesParams, Config
from clips4.pipeline.datasets import Dataset, ImageRecord
from clips4.pipeline.grid import pixel_to_cell, resize_nearest

__all__ = [
    "segment_embeddings",
    "segment_majority_labels",
    "knn_classify",
    "knn_segmentation",
    "train_linear_classifier",
    "linear_logits",
    "linear_segmentation",
    "run_unsupervised",
]


def segment_embeddings(pixel_emb: np.ndarray, segments: np.ndarray, n_segments: int | None = None) -> np.ndarray:
    """``(n, D) float32``: the L2-normalised mean embedding of each segment id ``0..n-1`` (zero where a segment has
    no pixel). ``pixel_emb (h, w, D)``; ``segments`` at the grid or at image resolution, where each pixel takes
    its grid cell's embedding (:func:`clips4.pipeline.prototypes.segment_embeddings`, so none is lost)."""
    from clips4.pipeline.prototypes import segment_embeddings as _per_segment

    segments = np.asarray(segments)
    n = (int(segments.max()) + 1 if segments.size and segments.max() >= 0 else 0) if n_segments is None else n_segments
    out = np.zeros((n, np.asarray(pixel_emb).shape[-1]), np.float32)
    se = _per_segment(np.asarray(pixel_emb, np.float32), np.where(segments < n, segments, -1))
    out[se.segment_id] = se.embedding
    return out


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


def _consecutive(seg: np.ndarray) -> tuple[np.ndarray, int]:
    """Segment ids renumbered 0..n-1 (negative = none stays -1)."""
    seg = np.asarray(seg).astype(np.int64)
    out = np.full(seg.shape, -1, np.int64)
    ok = seg >= 0
    ids, inv = np.unique(seg[ok], return_inverse=True)
    out[ok] = inv
    return out, len(ids)


@dataclass
class _SegmentSource:
    kind: str  # ucm | kmeans
    reader: object | None = None
    n_clusters: int = 8
    seed: int = 0

    def __call__(self, rec: ImageRecord, emb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` segment ids 0..n-1 for the image."""
        if self.kind == "ucm":
            seg = np.asarray(self.reader.get(rec.image_id, "labels"))  # type: ignore[union-attr]
            if seg.shape != tuple(hw):
                seg = resize_nearest(seg, hw)
        else:
            from clips4.pipeline.prototypes import cluster_segments

            seg = resize_nearest(cluster_segments(emb, n_clusters=self.n_clusters, seed=self.seed), hw)
        return _consecutive(seg)[0]


def run_unsupervised(cfg: Config, train_ds: Dataset, eval_ds: Dataset, *, model: str = "teacher",
                     segments: str = "ucm", k: int = 10, n_clusters: int | None = None, pixels_per_image: int = 2000,
                     epochs: int = 10, lr: float = 0.1, seed: int = 0, device: str = "auto",
                     out: Path | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """k-NN segment classification and a linear classifier on frozen embeddings (paper section 4.4).

    k-NN: every training segment (UCM superpixels of the segments stage, or per-image k-means over the evaluated
    embeddings) gets the majority GT label of its pixels and its mean embedding; each evaluation segment takes
    the majority label of its ``k`` most cosine-similar training segments (FAISS, exact). Linear: logistic
    regression on up to ``pixels_per_image`` random labelled pixels per training image (each pixel takes the
    embedding of its grid cell); evaluation resizes the logits bilinearly to the GT size."""
    from clips4.evaluate.report import write_report
    from clips4.pipeline.stage import open_stage

    if segments not in ("ucm", "kmeans"):
        raise ValueError(f"--segments must be ucm or kmeans, got {segments!r}")
    say = progress or (lambda m: None)
    names = list(eval_ds.class_names or train_ds.class_names or [])
    if not names:
        raise ValueError(f"dataset {eval_ds.kind} at {eval_ds.root} has no class names (classes.txt)")
    nc = len(names)
    ignore = eval_ds.ignore_index
    cf: ClipFeaturesParams = cfg.params("clip_features")  # type: ignore[assignment]

    def seg_source(ds: Dataset) -> _SegmentSource:
        if segments == "ucm":
            return _SegmentSource("ucm", open_stage(cfg if ds.split == cfg.dataset.split else with_split(cfg, ds.split), "segments", ds))
        return _SegmentSource("kmeans", None, n_clusters or cf.n_clusters, cf.seed)

    def source(ds: Dataset) -> EmbeddingSource:
        return embedding_source(cfg if ds.split == cfg.dataset.split else with_split(cfg, ds.split), ds, model, device)

    src_tr = source(train_ds)
    segs_tr = seg_source(train_ds)
    rng = np.random.default_rng(seed)
    seg_vecs, seg_labels, px_x, px_y = [], [], [], []
    n_train = 0
    for rec in train_ds.records():
        if not rec.gt_path:
            continue
        gt = train_ds.load_gt(rec)
        emb = src_tr.embed(rec)
        H, W = gt.shape
        seg = segs_tr(rec, emb, (H, W))
        seg_vecs.append(segment_embeddings(emb, seg))
        seg_labels.append(segment_majority_labels(seg, gt, nc, ignore, n_segments=len(seg_vecs[-1])))
        ok = np.flatnonzero((gt.ravel() != ignore) & (gt.ravel() >= 0) & (gt.ravel() < nc))
        pick = rng.choice(ok, size=min(pixels_per_image, len(ok)), replace=False) if len(ok) else ok
        ys, xs = pixel_to_cell(H, W, emb.shape[0], emb.shape[1])
        py, pxx = pick // W, pick % W
        px_x.append(emb[ys[py], xs[pxx]])
        px_y.append(gt.ravel()[pick])
        n_train += 1
    if not n_train:
        raise ValueError(f"training split {train_ds.split!r} of {train_ds.root} has no ground truth")
    train_emb = np.concatenate(seg_vecs)
    train_lab = np.concatenate(seg_labels)
    say(f"train: {n_train} images, {int((train_lab != ignore).sum())} labelled segments, "
        f"{sum(len(y) for y in px_y)} labelled pixels")
    linear = train_linear_classifier(np.concatenate(px_x), np.concatenate(px_y), nc, epochs=epochs, lr=lr,
                                     ignore_index=ignore, seed=seed, device=str(torch_device(device)))

    src_ev = source(eval_ds)
    segs_ev = seg_source(eval_ds)
    recs = [r for r in eval_ds.records() if r.gt_path]
    if not recs:
        raise ValueError(f"evaluation split {eval_ds.split!r} of {eval_ds.root} has no ground truth")

    def knn_items():
        for rec in recs:
            gt = eval_ds.load_gt(rec)
            emb = src_ev.embed(rec)
            seg = segs_ev(rec, emb, gt.shape)
            yield segment_embeddings(emb, seg), seg, gt

    def linear_items():
        for rec in recs:
            yield src_ev.embed(rec), eval_ds.load_gt(rec)

    knn = knn_segmentation(train_emb, train_lab, knn_items(), nc, k=k, ignore_index=ignore, class_names=names)
    lin = linear_segmentation(linear, linear_items(), nc, ignore_index=ignore, class_names=names)
    res = {
        "task": "unsupervised", "method": src_ev.name, "model": src_ev.name,
        "knn_miou": knn["miou"], "linear_miou": lin["miou"],
        "knn": knn, "linear": lin, "classes": names,
        "train_dataset": train_ds.describe(), "dataset": eval_ds.describe(),
        "n_train_images": n_train, "n_train_segments": int((train_lab != ignore).sum()), "n_images": len(recs),
        "settings": {"segments": segments, "k": k, "n_clusters": n_clusters or cf.n_clusters if segments == "kmeans" else None,
                     "pixels_per_image": pixels_per_image, "epochs": epochs, "lr": lr, "seed": seed},
        "embedding": src_ev.info,
    }
    if train_ds.split == eval_ds.split:
        res["note"] = "training and evaluation split are the same (transductive read-out)"
    if out is not None:
        write_report(out, res, title=f"unsupervised segmentation — {src_ev.name} on {eval_ds.key}", class_names=names,
                     config=config_summary(cfg), fingerprints={"train": src_tr.fingerprint, "eval": src_ev.fingerprint})
    return res
