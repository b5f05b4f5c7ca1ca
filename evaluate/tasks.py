"""Evaluation tasks on top of the caches and checkpoints: where embeddings come from, which text embeddings,
which ground truth. The metric code lives in ``metrics``/``language``/``davis``/``unsupervised``.

Embedding sources (``--model``):
- ``teacher``: the cached CLIP dense features of the clip_features stage (the MaskCLIP row of the paper's
  tables; no training involved).
- a checkpoint path: the trained pixel embedding network, run on each image (sliding windows for large images).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clips4 import data as bundled
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


def embedding_source(cfg: Config, dataset: Dataset, model: str, device: str = "auto") -> EmbeddingSource:
    """``model`` = ``teacher`` (cached CLIP features) or a checkpoint path."""
    from clips4.pipeline.stage import open_stage

    if model == "teacher":
        feats = open_stage(cfg, "clip_features", dataset)

        def embed(rec: ImageRecord) -> np.ndarray:
            return feats.get(rec.image_id, "features").astype(np.float32)

        return EmbeddingSource("teacher (CLIP dense features)", embed, feats.fingerprint)
    from clips4.trainer.train import load_trained_model

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    net, ck = load_trained_model(model, dev)
    fn = model_embedder(net, dev)
    import hashlib

    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:16]
    return EmbeddingSource(f"CLIP-S4 ({Path(model).name})", lambda rec: fn(load_rgb(rec.path)), digest, fn)


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


def run_language(cfg: Config, dataset: Dataset, *, model: str = "teacher", classes: str | None = None,
                 voc_mode: int = 21, save_predictions: Path | None = None, out: Path | None = None,
                 device: str = "auto", overlays: int = 4) -> dict:
    """Language-driven segmentation over ``dataset``: mIoU, per-class IoU, pixel accuracy; report in ``out``."""
    from clips4.evaluate.language import evaluate_language, voc_gt_transform
    from clips4.evaluate.metrics import ConfusionMatrix
    from clips4.evaluate.report import write_report

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
    records = [r for r in dataset.records() if r.gt_path]
    if not records:
        raise ValueError(f"dataset {dataset.kind} at {dataset.root} has no ground truth to evaluate against")
    cm = ConfusionMatrix(len(names), dataset.ignore_index)
    res = evaluate_language(records, dataset.load_gt, src.embed, text, names, dataset.ignore_index, save_predictions,
                            gt_transform=gt_transform, save_offset=save_offset, confusion=cm)
    res.update({"task": "language", "model": src.name, "dataset": dataset.describe(), "classes": names,
                "voc_mode": voc_mode if dataset.kind == "voc" else None})
    if out is not None:
        from clips4.evaluate.language import predict_labels

        shown = []
        for rec in records[:overlays]:
            img = load_rgb(rec.path)
            gt = dataset.load_gt(rec)
            if gt_transform is not None:
                gt = gt_transform(gt)
            shown.append((img, predict_labels(src.embed(rec), text, gt.shape, layout="hwd"), gt))
        write_report(out, res, title=f"language-driven segmentation — {src.name} on {dataset.key}", class_names=names,
                     confusion=cm, overlays=shown, config=None,
                     fingerprints={"embeddings": src.fingerprint, "text_backend": backend_info.get("name", "")})
    return res
