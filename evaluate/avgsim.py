"""avgsim (paper 4.6, Tab. 6): how close a trained model's segment embeddings stay to CLIP's."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clips4.evaluate.compat import check_width
from clips4.evaluate.sources import checkpoint_source, config_summary, warn_clip_mismatch
from clips4.pipeline.cache import float_rows_numpy
from clips4.pipeline.config import Config
from clips4.pipeline.datasets import Dataset
from clips4.pipeline.grid import resize_nearest
from clips4.pipeline.images import load_rgb
from clips4.pipeline.prototypes import segment_embeddings


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
    src = checkpoint_source(checkpoint, device)  # a missing or foreign checkpoint fails before any cache read
    feats = open_stage(cfg, "clip_features", dataset)
    ucm = open_stage(cfg, "segments", dataset) if segments == "ucm" else None
    warn_clip_mismatch(cfg, src)
    cached: dict[str, dict[int, np.ndarray]] = {}
    if segments == "clip":
        for b in feats.iter_table("segments", columns=["image_id", "segment_id", "embedding"]):
            vec = float_rows_numpy(b.column("embedding"))
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
            seg = resize_nearest(lab, (H, W))
        else:
            seg = np.asarray(ucm.get(rec.image_id, "labels")).astype(np.int64)  # type: ignore[union-attr]
            if seg.shape != (H, W):
                seg = resize_nearest(seg, (H, W))
            ce = segment_embeddings(feats.get(rec.image_id, "features").astype(np.float32), seg)
            ids, clip_vecs = ce.segment_id.tolist(), ce.embedding
        if not ids:
            continue
        check_width(mine.shape[-1], np.shape(clip_vecs)[-1], source=str(checkpoint),
                    against=f"the CLIP features in {feats.url}")
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
