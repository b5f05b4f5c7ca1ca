"""Evaluation tasks on top of the caches and checkpoints: where embeddings come from, which text embeddings,
which ground truth. The metric code lives in ``metrics``/``language``/``davis``/``unsupervised``.

Embedding sources (``--model``):
- ``teacher``: the cached CLIP dense features of the clip_features stage (the MaskCLIP row of the paper's
  tables; no training involved).
- a checkpoint path: the trained pixel embedding network, run on each image (sliding windows for large images).

Tasks (each also a command, see :func:`register_commands`):
- :func:`run_language` — ``clips4 evaluate language`` (paper 4.3): pixels take the class of the closest text.
- :func:`run_unsupervised` — ``clips4 evaluate unsupervised`` (paper 4.4): k-NN segment retrieval and a linear
  classifier on frozen pixel embeddings.
- :func:`run_avgsim` — ``clips4 evaluate avgsim`` (paper 4.6, Tab. 6): mean cosine between the model's and
  CLIP's segment embeddings.
- :func:`predict_images` — ``clips4 predict``: label PNG, overlay with legend, class areas for any images.
- ``clips4 evaluate class-free`` lives in :mod:`clips4.evaluate.classfree`; ``clips4 report`` is
  :func:`clips4.evaluate.report.report_command`; ``clips4 evaluate davis --embedding checkpoint`` uses the
  embedder registered here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence  # List/Optional: the typer signatures below

import numpy as np
import torch

from clips4 import data as bundled
from clips4.evaluate.compat import check_width, source_width
from clips4.evaluate.palette import voc_palette
from clips4.pipeline.config import ClipFeaturesParams, Config
from clips4.pipeline.datasets import Dataset, ImageRecord
from clips4.pipeline.images import load_rgb

#: images whose long side exceeds this are embedded by sliding windows of this size (2/3 overlap stride)
MAX_SIDE = 640


@dataclass
class EmbeddingSource:
    """``embed(record) -> (h, w, D) float32`` L2-normalised, plus what identifies it in reports."""

    name: str
    embed: Callable[[ImageRecord], np.ndarray]
    fingerprint: str
    embed_image: Callable[[np.ndarray], np.ndarray] | None = None
    #: for a checkpoint: its path, known classes and the CLIP params it was trained against
    info: dict = field(default_factory=dict)


def torch_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_embedder(model: torch.nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """``image (H, W, 3) uint8 -> (h, w, D) float32`` from a trained network (output stride 8)."""
    from clips4.evaluate.language import sliding_window_embed
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


def checkpoint_source(path: str | Path, device: str | None = "auto") -> EmbeddingSource:
    """A trained checkpoint as an embedding source (image -> embeddings; no cache needed)."""
    from clips4.trainer.train import load_trained_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    dev = torch_device(device)
    net, ck = load_trained_model(path, dev)
    fn = model_embedder(net, dev)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    try:
        stages = json.loads(ck.get("config") or "{}").get("stages", {})
    except (TypeError, ValueError):
        stages = {}
    info = {"checkpoint": str(path), "sha256_16": digest, "known_classes": list(ck.get("classes") or []),
            "clip": stages.get("clip_features", {}).get("params", {}).get("clip"),
            "train_seed": stages.get("train", {}).get("params", {}).get("seed"),
            "step": int(ck["step"]) if "step" in ck else None,
            "signature": json.loads(ck["signature"]) if "signature" in ck else None}
    return EmbeddingSource(f"CLIP-S4 ({path.parent.name}/{path.name})", lambda rec: fn(load_rgb(rec.path)), digest, fn, info)


def embedding_source(cfg: Config, dataset: Dataset, model: str, device: str = "auto") -> EmbeddingSource:
    """``model`` = ``teacher`` (cached CLIP features) or a checkpoint path."""
    from clips4.pipeline.stage import open_stage

    if model == "teacher":
        feats = open_stage(cfg, "clip_features", dataset)

        def embed(rec: ImageRecord) -> np.ndarray:
            return feats.get(rec.image_id, "features").astype(np.float32)

        return EmbeddingSource("teacher (CLIP dense features)", embed, feats.fingerprint, info={"cache": feats.url})
    src = checkpoint_source(model, device)
    _warn_clip_mismatch(cfg, src)
    return src


def _warn_clip_mismatch(cfg: Config, src: EmbeddingSource) -> None:
    """A checkpoint is only meaningful against the CLIP text space it was trained in: say so when they differ."""
    trained = src.info.get("clip")
    if not trained:
        return
    now = cfg.params("clip_features").clip.model_dump(mode="json")  # type: ignore[attr-defined]
    keys = ("backend", "model", "pretrained", "checkpoint", "backend_params")
    diff = [k for k in keys if trained.get(k) != now.get(k)]
    if diff:
        from rich.console import Console

        Console(stderr=True).print(
            f"[yellow]warning:[/] {src.info['checkpoint']} was trained against CLIP "
            f"{ {k: trained.get(k) for k in diff} } but the text embeddings come from { {k: now.get(k) for k in diff} }")


def parse_class_list(spec: str) -> list[str]:
    """``"sky,tree,moon"``, a bundled list name (voc, voc21, context59, cocostuff171) or a text file."""
    if "," in spec:
        names = [c.strip() for c in spec.split(",") if c.strip()]
    elif spec in bundled.CLASS_LISTS or Path(spec).is_file():
        names = bundled.class_names(spec)
    else:
        names = [spec.strip()] if spec.strip() else []
    if not names:
        raise ValueError(f"no class names in {spec!r}")
    return names


def resolve_classes(spec: str | None, dataset: Dataset) -> list[str]:
    """Class names from ``--classes``: a bundled list, a file, a comma-separated list, or the dataset's own."""
    if spec:
        if "," in spec:
            return [c.strip() for c in spec.split(",") if c.strip()]
        return bundled.class_names(spec)
    names = dataset.class_names
    if not names:
        raise ValueError(f"dataset {dataset.kind} at {dataset.root} has no class names; pass --classes")
    return list(names)


def text_embeddings_for(cfg: Config, names: list[str]) -> tuple[np.ndarray, dict]:
    """Text embeddings of ``names`` (85 templates) from the backend the clip_features stage is configured with."""
    from clips4.pipeline.backends import text_embeddings
    from clips4.pipeline.processors import build_backend

    params: ClipFeaturesParams = cfg.params("clip_features")  # type: ignore[assignment]
    backend = build_backend(params.clip)
    return text_embeddings(backend, names, bundled.prompt_templates()), backend.info()


def with_split(cfg: Config, split: str | None) -> Config:
    """``cfg`` for another split of the same dataset."""
    c = cfg.model_copy(deep=True)
    c.dataset = c.dataset.model_copy(update={"split": split})
    return c


def with_params(cfg: Config, **stages: dict) -> Config:
    """``cfg`` with some stage params replaced, e.g. ``with_params(cfg, train={"seed": 1})``."""
    from clips4.pipeline.config import StageDecl

    c = cfg.model_copy(deep=True)
    new = dict(c.stages)
    for stage, upd in stages.items():
        decl = new.get(stage, StageDecl())
        new[stage] = StageDecl(deps=list(decl.deps), outs=list(decl.outs), params={**decl.params, **upd})
    c.stages = new
    for stage in stages:  # validate now: a typo must fail before any work
        c.params(stage)
    return c


def precompute(cfg: Config, stages: Sequence[str], show_progress: bool = False) -> None:
    """Run pipeline stages (finished images are skipped, so this is cheap when the cache is complete)."""
    from clips4.pipeline.stage import StageError, run_stage

    for name in stages:
        run = run_stage(cfg, name, show_progress=show_progress)
        if run.failed:
            raise StageError(f"{name}: {len(run.failed)} image(s) failed, e.g. {run.failed[0][0]}: {run.failed[0][1]}")


def config_summary(cfg: Config) -> dict:
    from clips4.pipeline.config import resolved_dict

    return resolved_dict(cfg)


# ------------------------------------------------------------------------------------------------- language
def language_confusion(src: EmbeddingSource, dataset: Dataset, names: list[str], text: np.ndarray, *,
                       gt_transform=None, save_predictions: Path | None = None, save_offset: int = 0):
    """(metrics dict, ConfusionMatrix, records) of language-driven segmentation with ``text`` over ``dataset``."""
    from clips4.evaluate.language import evaluate_language
    from clips4.evaluate.metrics import ConfusionMatrix

    records = [r for r in dataset.records() if r.gt_path]
    if not records:
        raise ValueError(f"dataset {dataset.kind} at {dataset.root} (split {dataset.split}) has no ground truth to evaluate against")
    check_width(source_width(src), np.shape(text)[-1], source=src.info.get("checkpoint", src.name),
                against="the text embeddings of the configured CLIP backend")
    cm = ConfusionMatrix(len(names), dataset.ignore_index)
    res = evaluate_language(records, dataset.load_gt, src.embed, text, names, dataset.ignore_index, save_predictions,
                            gt_transform=gt_transform, save_offset=save_offset, confusion=cm)
    return res, cm, records


def run_language(cfg: Config, dataset: Dataset, *, model: str = "teacher", classes: str | None = None,
                 voc_mode: int = 21, save_predictions: Path | None = None, out: Path | None = None,
                 device: str = "auto", overlays: int = 4) -> dict:
    """Language-driven segmentation over ``dataset``: mIoU, per-class IoU, pixel accuracy; report in ``out``."""
    from clips4.evaluate.language import predict_labels, voc_gt_transform
    from clips4.evaluate.report import write_report

    if int(voc_mode) not in (20, 21):
        raise ValueError(f"--voc-mode must be 20 or 21, got {voc_mode}")
    src = embedding_source(cfg, dataset, model, device)
    names = resolve_classes(classes, dataset)
    gt_transform = None
    save_offset = 0
    if dataset.kind == "voc" and not classes:
        if voc_mode == 20:
            names = names[1:]
            gt_transform = lambda g: voc_gt_transform(g, 20)  # noqa: E731
            save_offset = 1
    text, backend_info = text_embeddings_for(cfg, names)
    res, cm, records = language_confusion(src, dataset, names, text, gt_transform=gt_transform,
                                          save_predictions=save_predictions, save_offset=save_offset)
    res.update({"task": "language", "method": src.name, "model": src.name, "dataset": dataset.describe(),
                "classes": names, "voc_mode": voc_mode if dataset.kind == "voc" else None, "embedding": src.info})
    if out is not None:
        shown = []
        for rec in records[:overlays]:
            img = load_rgb(rec.path)
            gt = dataset.load_gt(rec)
            if gt_transform is not None:
                gt = gt_transform(gt)
            shown.append((img, predict_labels(src.embed(rec), text, gt.shape, layout="hwd"), gt))
        res["report"] = {k: str(v) for k, v in write_report(
            out, res, title=f"language-driven segmentation — {src.name} on {dataset.key}", class_names=names,
            confusion=cm, overlays=shown, config=config_summary(cfg),
            fingerprints={"embeddings": src.fingerprint, "text_backend": backend_info}).items()}
    return res


# --------------------------------------------------------------------------------------------- unsupervised
def _consecutive(seg: np.ndarray) -> tuple[np.ndarray, int]:
    """Segment ids renumbered 0..n-1 (negative = none stays -1)."""
    seg = np.asarray(seg).astype(np.int64)
    out = np.full(seg.shape, -1, np.int64)
    ok = seg >= 0
    ids, inv = np.unique(seg[ok], return_inverse=True)
    out[ok] = inv
    return out, len(ids)


def _cell_of_pixels(H: int, W: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell row / column of every image row / column (pixel centres; the backend alignment contract)."""
    ys = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return ys, xs


def _upsample_nearest(labels: np.ndarray, H: int, W: int) -> np.ndarray:
    h, w = labels.shape
    ys, xs = _cell_of_pixels(H, W, h, w)
    return labels[ys[:, None], xs[None, :]]


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
                seg = _upsample_nearest(seg, *hw)
        else:
            from clips4.pipeline.prototypes import cluster_segments

            seg = _upsample_nearest(cluster_segments(emb, n_clusters=self.n_clusters, seed=self.seed), *hw)
        return _consecutive(seg)[0]


def _segment_vectors(emb: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """``(n, D)`` mean embedding of each segment 0..n-1 (pixels take their cell's embedding; none lost)."""
    from clips4.pipeline.prototypes import segment_embeddings

    n = int(seg.max()) + 1 if seg.size and seg.max() >= 0 else 0
    out = np.zeros((n, emb.shape[-1]), np.float32)
    se = segment_embeddings(emb, seg)
    out[se.segment_id] = se.embedding
    return out


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
    from clips4.evaluate.unsupervised import knn_segmentation, linear_segmentation, segment_majority_labels, \
        train_linear_classifier
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
        seg_vecs.append(_segment_vectors(emb, seg))
        seg_labels.append(segment_majority_labels(seg, gt, nc, ignore, n_segments=len(seg_vecs[-1])))
        ok = np.flatnonzero((gt.ravel() != ignore) & (gt.ravel() >= 0) & (gt.ravel() < nc))
        pick = rng.choice(ok, size=min(pixels_per_image, len(ok)), replace=False) if len(ok) else ok
        ys, xs = _cell_of_pixels(H, W, emb.shape[0], emb.shape[1])
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
            yield _segment_vectors(emb, seg), seg, gt

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


# --------------------------------------------------------------------------------------------------- avgsim
def run_avgsim(cfg: Config, dataset: Dataset, checkpoint: str | Path, *, segments: str = "clip", device: str = "auto",
               out: Path | None = None) -> dict:
    """Mean cosine similarity between the model's and CLIP's segment embeddings (paper's *avgsim*, Tab. 6).

    ``segments="clip"``: the cached CLIP segments of the clip_features stage (``segment_labels`` at the CLIP grid,
    their cached embeddings); ``"ucm"``: the UCM superpixels of the segments stage, CLIP's embedding of each being
    the mean of the cached CLIP features over it. The model's segment embedding is the normalised mean of its
    pixel embeddings over the same region (each pixel takes its grid cell's embedding)."""
    from clips4.evaluate.report import write_report
    from clips4.pipeline.stage import open_stage

    if segments not in ("clip", "ucm"):
        raise ValueError(f"--segments must be clip or ucm, got {segments!r}")
    feats = open_stage(cfg, "clip_features", dataset)
    ucm = open_stage(cfg, "segments", dataset) if segments == "ucm" else None
    src = checkpoint_source(checkpoint, device)
    _warn_clip_mismatch(cfg, src)
    cached: dict[str, dict[int, np.ndarray]] = {}
    if segments == "clip":
        for b in feats.iter_table("segments", columns=["image_id", "segment_id", "embedding"]):
            d = b.schema.field("embedding").type.list_size
            vec = b.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
            for img, sid, v in zip(b.column("image_id").to_pylist(), b.column("segment_id").to_pylist(), vec):
                cached.setdefault(img, {})[int(sid)] = v.astype(np.float32)
    sims, per_image = [], {}
    for rec in dataset.records():
        img = load_rgb(rec.path)
        H, W = img.shape[:2]
        mine = src.embed_image(img)  # type: ignore[misc]
        if segments == "clip":
            lab = np.asarray(feats.get(rec.image_id, "segment_labels")).astype(np.int64)
            ids = sorted(cached.get(rec.image_id, {}))
            clip_vecs = np.stack([cached[rec.image_id][i] for i in ids]) if ids else np.zeros((0, 1), np.float32)
            seg = _upsample_nearest(lab, H, W)
        else:
            seg = np.asarray(ucm.get(rec.image_id, "labels")).astype(np.int64)  # type: ignore[union-attr]
            if seg.shape != (H, W):
                seg = _upsample_nearest(seg, H, W)
            from clips4.pipeline.prototypes import segment_embeddings

            ce = segment_embeddings(feats.get(rec.image_id, "features").astype(np.float32), seg)
            ids, clip_vecs = ce.segment_id.tolist(), ce.embedding
        if not ids:
            continue
        check_width(mine.shape[-1], np.shape(clip_vecs)[-1], source=str(checkpoint), against=f"the CLIP features in {feats.url}")
        from clips4.pipeline.prototypes import segment_embeddings

        me = segment_embeddings(mine, seg)
        pos = {int(s): i for i, s in enumerate(me.segment_id.tolist())}
        keep = [j for j, s in enumerate(ids) if s in pos]
        if not keep:
            continue
        a = np.stack([me.embedding[pos[ids[j]]] for j in keep]).astype(np.float64)
        b = np.asarray(clip_vecs, np.float64)[keep]
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        s = (a * b).sum(1)
        sims.append(s)
        per_image[rec.image_id] = {"avgsim": float(s.mean()), "n_segments": int(len(s))}
    if not sims:
        raise ValueError(f"no segments to compare in {feats.url}")
    allsim = np.concatenate(sims)
    res = {"task": "avgsim", "method": src.name, "model": src.name, "avgsim": float(allsim.mean()),
           "avgsim_std": float(allsim.std()), "n_segments": int(len(allsim)), "n_images": len(per_image),
           "segments": segments, "dataset": dataset.describe(), "per_image": per_image, "embedding": src.info}
    if out is not None:
        write_report(out, res, title=f"avgsim — {src.name} vs CLIP on {dataset.key}", config=config_summary(cfg),
                     fingerprints={"clip_features": feats.fingerprint, "checkpoint": src.fingerprint})
    return res


# -------------------------------------------------------------------------------------------------- predict
#: free-form classes have no background: class 0 gets the VOC palette's colour 1 (dark red), not black
PREDICT_PALETTE = np.concatenate([voc_palette()[1:], np.zeros((1, 3), np.uint8)])

def predict_images(cfg: Config, images: Sequence[str | Path], classes: list[str], out: Path, *,
                   model: str = "teacher", device: str = "auto", alpha: float = 0.5,
                   on_result: Callable[[str, dict | None, str | None], None] | None = None) -> dict:
    """Label PNG, overlay with legend and class areas (JSON) for each image; returns ``{"written", "failed"}``.

    ``model="teacher"`` runs the configured CLIP backend's ``dense_features`` on the image itself (images need
    not be in any cache); a checkpoint path runs the trained network. An image that cannot be read or embedded
    is reported in ``failed`` (with the reason naming it); the others are still written."""
    from clips4.evaluate.language import predict_labels
    from clips4.evaluate.predict import render_prediction
    from clips4.pipeline.processors import build_backend

    text, backend_info = text_embeddings_for(cfg, classes)
    if model == "teacher":
        backend = build_backend(cfg.params("clip_features").clip)  # type: ignore[attr-defined]
        embed = lambda img: np.asarray(backend.dense_features([img])[0], np.float32)  # noqa: E731
        name = f"teacher ({backend_info.get('name', 'CLIP')})"
    else:
        src = checkpoint_source(model, device)
        _warn_clip_mismatch(cfg, src)
        check_width(source_width(src), np.shape(text)[-1], source=str(model),
                    against="the text embeddings of the configured CLIP backend")
        embed, name = src.embed_image, src.name
    out = Path(out)
    written, failed = {}, {}
    stems: dict[str, int] = {}
    for path in images:
        path = str(path)
        stem = Path(path).stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # two inputs with the same name must not overwrite each other
            stem = f"{stem}_{stems[stem]}"
        try:
            img = load_rgb(path)
            emb = embed(img)
            labels = predict_labels(emb, text, img.shape[:2], layout="hwd")
            r = render_prediction(img, labels, classes, out, stem, alpha=alpha, palette=PREDICT_PALETTE)
            doc = json.loads(Path(r["areas_json"]).read_text())
            doc.update({"image": path, "model": name, "queried_classes": list(classes)})
            Path(r["areas_json"]).write_text(json.dumps(doc, indent=2))
            written[path] = {k: str(r[k]) for k in ("labels", "overlay", "areas_json")} | {"areas": r["areas"]}
            if on_result:
                on_result(path, written[path], None)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
            msg = str(exc) if path in str(exc) else f"{path}: {exc}"
            failed[path] = msg
            if on_result:
                on_result(path, None, msg)
    return {"written": written, "failed": failed, "model": name, "classes": list(classes)}


# -------------------------------------------------------------------------------------------- DAVIS embedder
def _davis_checkpoint_factory(checkpoint: Path | None = None, device: str | None = None, **_):
    if checkpoint is None:
        from clips4.pipeline.cli import CLIError  # a usage error: printed without a traceback, exit status 2

        raise CLIError("--embedding checkpoint needs --checkpoint PATH (a clips4 train final.pt)")
    return checkpoint_source(checkpoint, device or "auto").embed_image


def _register_davis() -> None:
    from clips4.evaluate.davis import register_embedder

    register_embedder("checkpoint", _davis_checkpoint_factory)


_register_davis()


# ------------------------------------------------------------------------------------------------- commands
def _print_metrics(console, res: dict, title: str) -> None:
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    t = Table(title=title)
    for col in ("mIoU", "pAcc", "mAcc", "classes evaluated", "images"):
        t.add_column(col, justify="right")
    t.add_row(pct(res.get("miou")), pct(res.get("pixel_accuracy")), pct(res.get("mean_accuracy")),
              f"{res.get('num_classes_evaluated')}/{res.get('num_classes')}", str(res.get("n_images")))
    console.print(t)
    pc = Table(title="per-class IoU (%)")
    pc.add_column("class")
    pc.add_column("IoU", justify="right")
    for name, v in (res.get("per_class_iou") or {}).items():
        pc.add_row(name, pct(v))
    console.print(pc)


VOC_MODE_HELP = ("VOC convention (only for --dataset voc without --classes): 21 = background + 20 objects, a "
                 "'background' prompt competes like any class (MaskCLIP/mmseg); 20 = the 20 object classes only, GT "
                 "background pixels are ignored and saved predictions keep VOC ids 1..20.")


def register_commands(app, evaluate_app) -> None:
    """Mount ``evaluate language|unsupervised|avgsim|class-free``, ``predict`` and ``report`` on the CLI.

    Called by ``clips4.pipeline.cli`` once its shared option objects exist (they are reused here)."""
    import typer
    from rich.console import Console

    from clips4.evaluate.report import report_command
    from clips4.pipeline import cli
    from clips4.pipeline.cli import (CacheOpt, ConfigOpt, DatasetOpt, LimitOpt, RootOpt, SetOpt, SplitOpt, StagesOpt,
                                     build_config)

    console = Console()
    if not console.is_terminal:  # logs and pipes are not 80 columns: keep table rows on one line
        console = Console(width=160)
    DeviceOpt = typer.Option("auto", "--device", help="Torch device for checkpoints: auto (cuda if available), cpu, cuda:0.")
    PrecomputeOpt = typer.Option(False, "--precompute", help="First run the stages this needs (cached images are skipped).")

    def _open(cfg, split=None):
        from clips4.pipeline.stage import dataset_from_config

        return dataset_from_config(cfg if split is None else with_split(cfg, split))

    def _model(model: str, checkpoint: Optional[Path]) -> str:
        return str(checkpoint) if checkpoint is not None else model

    def _fail(exc: Exception):
        raise cli.CLIError(str(exc)) from None

    @evaluate_app.command("language")
    def language_command(
        config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
        dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt, split: Optional[str] = SplitOpt,
        limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt,
        model: str = typer.Option("teacher", "--model", help="'teacher' (cached CLIP dense features: the MaskCLIP baseline) or a checkpoint path."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Evaluate this trained model (a clips4 train final.pt); overrides --model."),
        classes: Optional[str] = typer.Option(None, "--classes", help="Class names in GT id order: voc21, context59, a file or 'a,b,c' (default: the dataset's)."),
        voc_mode: int = typer.Option(21, "--voc-mode", help=VOC_MODE_HELP),
        save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="Write predicted label PNGs (dataset ids) into this folder."),
        out: Path = typer.Option(Path("runs/language"), "--out", help="Report folder: results.json, report.md, PNG figures."),
        overlays: int = typer.Option(4, "--overlays", help="Number of image | prediction | GT figures in the report."),
        device: str = DeviceOpt, precompute_: bool = PrecomputeOpt,
    ) -> None:
        """Language-driven segmentation (paper 4.3): each pixel takes the class whose text embedding is closest.

        Prints mIoU, pixel accuracy and per-class IoU; writes the report (JSON with numbers, config and
        fingerprints, Markdown table, figures) into --out."""
        cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache)
        ds = _open(cfg)
        m = _model(model, checkpoint)
        if precompute_ and m == "teacher":
            precompute(cfg, ["clip_features"])
        try:
            res = run_language(cfg, ds, model=m, classes=classes, voc_mode=voc_mode, save_predictions=save_predictions,
                               out=out, device=device, overlays=overlays)
        except ValueError as exc:
            _fail(exc)
        _print_metrics(console, res, f"language-driven segmentation — {res['model']} on {ds.key}"
                       + (f" (VOC {voc_mode})" if ds.kind == "voc" and not classes else ""))
        console.print(f"report: {out}/report.md, {out}/results.json")

    @evaluate_app.command("unsupervised")
    def unsupervised_command(
        config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
        dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt,
        split: Optional[str] = typer.Option(None, "--split", help="Evaluation split (default: the config's / the reader's, e.g. val)."),
        train_split: str = typer.Option("train", "--train-split", help="Split whose GT labels the k-NN database and trains the linear classifier."),
        limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt,
        model: str = typer.Option("teacher", "--model", help="'teacher' (cached CLIP dense features) or a checkpoint path."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A trained model (final.pt); overrides --model."),
        segments: str = typer.Option("ucm", "--segments", help="Segments for k-NN: 'ucm' (the cached superpixels of the segments stage) or 'kmeans' (per-image k-means over the embeddings)."),
        n_clusters: Optional[int] = typer.Option(None, "--n-clusters", help="k-means segments per image (default: clip_features.n_clusters)."),
        k: int = typer.Option(10, "-k", "--k", help="Nearest training segments that vote."),
        pixels_per_image: int = typer.Option(2000, "--pixels-per-image", help="Labelled pixels sampled per training image for the linear classifier."),
        epochs: int = typer.Option(10, "--epochs", help="Linear classifier epochs."),
        lr: float = typer.Option(0.1, "--lr", help="Linear classifier learning rate (AdamW)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the pixel sampling and the classifier."),
        out: Path = typer.Option(Path("runs/unsupervised"), "--out", help="Report folder."),
        device: str = DeviceOpt, precompute_: bool = PrecomputeOpt,
    ) -> None:
        """Unsupervised segmentation read-outs (paper 4.4): k-NN segment classification and a linear classifier on
        frozen pixel embeddings; mIoU for both."""
        cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache)
        m = _model(model, checkpoint)
        eval_ds, train_ds = _open(cfg), _open(cfg, train_split)
        if precompute_:
            need = (["segments"] if segments == "ucm" else []) + (["clip_features"] if m == "teacher" else [])
            for c in (with_split(cfg, train_split), cfg):
                precompute(c, need)
        try:
            res = run_unsupervised(cfg, train_ds, eval_ds, model=m, segments=segments, k=k, n_clusters=n_clusters,
                                   pixels_per_image=pixels_per_image, epochs=epochs, lr=lr, seed=seed, device=device,
                                   out=out, progress=console.print)
        except ValueError as exc:
            _fail(exc)
        from rich.table import Table

        t = Table(title=f"unsupervised segmentation — {res['model']} ({train_ds.split} → {eval_ds.split})")
        for col in ("read-out", "mIoU", "pAcc", "images"):
            t.add_column(col, justify="right")
        for name, key in (("k-NN", "knn"), ("linear", "linear")):
            r = res[key]
            t.add_row(f"{name}" + (f" (k={k}, {segments} segments)" if key == "knn" else ""),
                      "-" if r["miou"] is None else f"{100 * r['miou']:.1f}",
                      "-" if r["pixel_accuracy"] is None else f"{100 * r['pixel_accuracy']:.1f}", str(r["n_images"]))
        console.print(t)
        if res.get("note"):
            console.print(f"[yellow]note:[/] {res['note']}")
        console.print(f"report: {out}/report.md")

    @evaluate_app.command("avgsim")
    def avgsim_command(
        checkpoint: Path = typer.Option(..., "--checkpoint", help="The trained model (final.pt) to compare with CLIP."),
        config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
        dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt, split: Optional[str] = SplitOpt,
        limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt,
        segments: str = typer.Option("clip", "--segments", help="'clip': the cached CLIP segments of clip_features; 'ucm': the cached superpixels."),
        out: Path = typer.Option(Path("runs/avgsim"), "--out", help="Report folder."),
        device: str = DeviceOpt,
    ) -> None:
        """avgsim (paper 4.6, Tab. 6): mean cosine similarity between the model's and CLIP's segment embeddings over
        the cached segments, with the number of segments."""
        cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache)
        try:
            res = run_avgsim(cfg, _open(cfg), checkpoint, segments=segments, device=device, out=out)
        except ValueError as exc:
            _fail(exc)
        console.print(f"avgsim = {res['avgsim']:.4f} (std {res['avgsim_std']:.4f}) over {res['n_segments']} segments "
                      f"in {res['n_images']} images ({segments} segments) — {res['model']}")
        console.print(f"report: {out}/report.md")

    @app.command("predict")
    def predict_command(
        images: List[Path] = typer.Argument(..., help="Image files (any format the segments stage reads)."),
        classes: str = typer.Option(..., "--classes", help="Class names: 'sky,tree,moon', a bundled list (voc21, context59, cocostuff171) or a text file."),
        model: str = typer.Option("teacher", "--model", help="'teacher': the configured CLIP backend run on each image; or a checkpoint path."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A trained model (final.pt); overrides --model."),
        out: Path = typer.Option(Path("predictions"), "--out", help="Folder for <stem>_labels.png, <stem>_overlay.png, <stem>_areas.json."),
        alpha: float = typer.Option(0.5, "--alpha", help="Opacity of the class colours in the overlay."),
        config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
        device: str = DeviceOpt,
    ) -> None:
        """Segment images with free-form class names: label PNG, colour overlay with a legend, class areas (JSON).

        Exit status 1 when any image failed (the others are still written)."""
        cfg = build_config(config, set_, stages)
        try:
            names = parse_class_list(classes)
        except (ValueError, FileNotFoundError) as exc:
            _fail(exc)

        def show(path, r, err):
            if err:
                cli.err_console.print(f"[red]error:[/] {err}")
            else:
                top = ", ".join(f"{n} {100 * a['fraction']:.0f}%" for n, a in list(r["areas"].items())[:4])
                console.print(f"{path} → {r['overlay']} ({top})")

        res = predict_images(cfg, images, names, out, model=_model(model, checkpoint), device=device, alpha=alpha,
                             on_result=show)
        console.print(f"{len(res['written'])} image(s) written to {out}, {len(res['failed'])} failed")
        if res["failed"]:
            raise typer.Exit(1)

    app.command("report")(report_command)

    from clips4.evaluate.classfree import register_command

    register_command(evaluate_app)
    _check_mounted(app, evaluate_app, cli.err_console)


def _check_mounted(app, evaluate_app, err_console) -> None:
    """Build every command once: a broken option declaration drops that command (with a warning) instead of
    taking the whole CLI down."""
    import typer.main as tm

    for group, prefix in ((app, ""), (evaluate_app, "evaluate ")):
        for info in list(group.registered_commands):
            try:
                tm.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=None)
            except Exception as exc:  # noqa: BLE001
                group.registered_commands.remove(info)
                err_console.print(f"[yellow]warning:[/] command '{prefix}{info.name}' is unavailable: {exc}")
