"""Where evaluated embeddings and text embeddings come from, and the config helpers the evaluations share.

Embedding sources (``--model``):

- ``teacher``: the cached CLIP dense features of the clip_features stage (the MaskCLIP row of the paper's tables;
  no training involved);
- a checkpoint path: the trained pixel embedding network, run on each image (sliding windows for large images).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from clips4 import data as bundled
from clips4.pipeline.config import ClipFeaturesParams, Config
from clips4.pipeline.datasets import Dataset, ImageRecord
from clips4.pipeline.images import load_rgb
from clips4.pipeline.io import file_sha256
from clips4.trainer.inference import model_embedder

@dataclass
class EmbeddingSource:
    """``embed(record) -> (h, w, D) float32`` L2-normalised, plus what identifies it in reports."""

    name: str
    embed: Callable[[ImageRecord], np.ndarray]
    fingerprint: str
    embed_image: Callable[[np.ndarray], np.ndarray] | None = None
    #: for a checkpoint: its path, known classes and the CLIP params it was trained against
    info: dict = field(default_factory=dict)
    #: for a checkpoint: the class calibration ``clips4 train`` stored in it (clips4.trainer.calibration), if any
    calibration: dict | None = None


def torch_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_checkpoint(path: str | Path, runs_root: str | Path = "runs") -> Path:
    """A checkpoint file from what a user passes: the file itself, a run folder (``runs/NAME`` or a training
    output folder: its ``final.pt``), or a run's name (``<runs_root>/NAME/final.pt``)."""
    p = Path(path)
    if p.is_dir():
        if (p / "final.pt").is_file():
            return p / "final.pt"
        raise FileNotFoundError(f"{p} is a folder without final.pt: not a finished training run (an unfinished one "
                                "has last.pt: continue it with `clips4 train --resume`)")
    if p.is_file():
        return p
    named = Path(runs_root) / str(path) / "final.pt"
    if p.suffix == "" and len(p.parts) == 1 and named.is_file():
        return named
    raise FileNotFoundError(f"checkpoint {path} not found (pass a final.pt, a run folder such as runs/NAME, or a "
                            f"run name published under {runs_root}/)")


def checkpoint_source(path: str | Path, device: str | None = "auto", runs_root: str | Path = "runs") -> EmbeddingSource:
    """A trained checkpoint (a file, a run folder or a run name) as an embedding source (image -> embeddings; no
    cache needed)."""
    from clips4.trainer.loading import load_trained_model

    path = resolve_checkpoint(path, runs_root)
    dev = torch_device(device)
    net, ck = load_trained_model(path, dev)
    fn = model_embedder(net, dev)
    digest = file_sha256(path)[:16]
    try:
        stages = json.loads(ck.get("config") or "{}").get("stages", {})
    except (TypeError, ValueError):
        stages = {}
    info = {"checkpoint": str(path), "sha256_16": digest, "known_classes": list(ck.get("classes") or []),
            "clip": stages.get("clip_features", {}).get("params", {}).get("clip"),
            "train_seed": stages.get("train", {}).get("params", {}).get("seed"),
            "step": int(ck["step"]) if "step" in ck else None,
            "signature": json.loads(ck["signature"]) if "signature" in ck else None}
    try:
        spec = json.loads(ck.get("clip") or "{}")
    except (TypeError, ValueError):
        spec = {}
    if spec.get("params"):
        info["clip"], info["clip_resolved"] = spec["params"], spec.get("resolved") or {}
    ct = ck.get("class_text")
    if isinstance(ct, dict) and ct.get("names"):
        info["class_text"] = (list(ct["names"]), np.asarray(ct["vectors"].float().cpu().numpy(), np.float32))
    return EmbeddingSource(f"CLIP-S4 ({path.parent.name}/{path.name})", lambda rec: fn(load_rgb(rec.path)), digest, fn, info,
                           ck.get("calibration"))


def embedding_source(cfg: Config, dataset: Dataset, model: str, device: str = "auto") -> EmbeddingSource:
    """``model`` = ``teacher`` (cached CLIP features) or a checkpoint path."""
    from clips4.pipeline.stage import open_stage

    if model == "teacher":
        feats = open_stage(cfg, "clip_features", dataset)

        def embed(rec: ImageRecord) -> np.ndarray:
            return feats.get(rec.image_id, "features").astype(np.float32)

        return EmbeddingSource("teacher (CLIP dense features)", embed, feats.fingerprint, info={"cache": feats.url})
    return checkpoint_source(model, device, cfg.runs_root)


#: CLIP params that decide the text space; the others (device, cache_dir, batch size, ...) are this machine's
CLIP_IDENTITY = ("backend", "backend_params", "model", "pretrained", "checkpoint", "variant")


def _trained_clip(src: EmbeddingSource) -> dict | None:
    """The CLIP params a checkpoint records, a moved backend's old spelling read as the current one."""
    from clips4.pipeline.config import current_backend_spec

    trained = src.info.get("clip")
    return {**trained, "backend": current_backend_spec(trained.get("backend"))} if trained else trained


def clip_config(cfg: Config, src: EmbeddingSource) -> Config:
    """``cfg`` with the CLIP a checkpoint was trained against (its text space), this machine's other CLIP settings
    kept; ``cfg`` itself for the teacher or a checkpoint that does not record one."""
    trained = _trained_clip(src)
    if not trained:
        return cfg
    now = cfg.params("clip_features").clip.model_dump(mode="json")  # type: ignore[attr-defined]
    if all(trained.get(k) == now.get(k) for k in CLIP_IDENTITY):
        return cfg
    return with_params(cfg, clip_features={"clip": {**now, **{k: trained.get(k) for k in CLIP_IDENTITY if k in trained}}})


def source_text_embeddings(cfg: Config, src: EmbeddingSource, names: list[str]) -> tuple[np.ndarray, dict]:
    """Text embeddings of ``names`` for ``src``: a checkpoint's stored class texts where it holds every name (no
    CLIP needed), else its own CLIP's text encoder (the one it was trained against), else the configured one —
    falling back to the configured CLIP with a warning only when the checkpoint's weights are not here."""
    stored = src.info.get("class_text")
    if stored and all(n in stored[0] for n in names):
        return stored[1][[stored[0].index(n) for n in names]], {"source": "checkpoint class texts"}
    own = clip_config(cfg, src)
    if own is cfg:
        return text_embeddings_for(cfg, names)
    from clips4.pipeline.clip.weights import WeightsNotFoundError

    try:
        return text_embeddings_for(own, names)
    except WeightsNotFoundError as exc:
        warn_clip_mismatch(cfg, src, why=f"its own CLIP weights are not here ({str(exc).splitlines()[0]})")
        return text_embeddings_for(cfg, names)


def warn_clip_mismatch(cfg: Config, src: EmbeddingSource, why: str = "") -> None:
    """A checkpoint is only meaningful against the CLIP text space it was trained in: say so when they differ."""
    trained = _trained_clip(src)
    if not trained:
        return
    now = cfg.params("clip_features").clip.model_dump(mode="json")  # type: ignore[attr-defined]
    keys = ("backend", "model", "pretrained", "checkpoint", "backend_params")
    diff = [k for k in keys if trained.get(k) != now.get(k)]
    if diff:
        from clips4.pipeline.console import make_console

        make_console(stderr=True).print(
            f"[yellow]warning:[/] {src.info['checkpoint']} was trained against CLIP "
            f"{ {k: trained.get(k) for k in diff} } but the text embeddings come from { {k: now.get(k) for k in diff} }"
            + (f": {why}" if why else ""))


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
    """Text embeddings of ``names`` (their prompt names, 85 templates) from the configured clip_features backend."""
    from clips4.pipeline.backends import class_text_embeddings
    from clips4.pipeline.processors import build_backend

    params: ClipFeaturesParams = cfg.params("clip_features")  # type: ignore[assignment]
    backend = build_backend(params.clip)
    return class_text_embeddings(backend, names), backend.info()


def with_split(cfg: Config, split: str | None) -> Config:
    """``cfg`` for another split of the same dataset."""
    c = cfg.model_copy(deep=True)
    c.dataset = c.dataset.model_copy(update={"split": split})
    return c


def with_params(cfg: Config, **stages: dict) -> Config:
    """``cfg`` with some stage params replaced, e.g. ``with_params(cfg, train={"seed": 1})``."""
    c = cfg.model_copy(deep=True)
    new = dict(c.stages)
    for stage, upd in stages.items():
        decl = c.decl(stage)
        new[stage] = decl.model_copy(update={"params": {**decl.params, **upd}})
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


def checkpoint_embedder(checkpoint: Path | None = None, device: str | None = None, **_):
    """``image (H, W, 3) uint8 -> (h, w, D)`` of a trained checkpoint (the DAVIS ``checkpoint`` embedder)."""
    if checkpoint is None:
        raise ValueError("--embedding checkpoint needs --checkpoint PATH (a clips4 train final.pt)")
    return checkpoint_source(checkpoint, device or "auto").embed_image
