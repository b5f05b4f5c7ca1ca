"""DAVIS 2017 mask propagation with pixel embeddings (paper section 4.5), scored exactly as the DAVIS 2017 toolkit.

:mod:`.propagation` holds the label propagation (and its protocol), :mod:`.metrics` the J / F metrics, this module
the runner: sequences and their frames come from :class:`clips4.pipeline.datasets.DavisDataset` (annotations
matched to frames **by name**), results are written per sequence as each finishes so a rerun only does what is
missing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clips4.evaluate.davis.metrics import evaluate_sequence, summarize
from clips4.evaluate.davis.propagation import EmbedFn, make_color_embedder, propagate_sequence
from clips4.evaluate.palette import save_indexed_png, voc_palette
from clips4.pipeline.datasets import DavisDataset, ImageRecord
from clips4.pipeline.images import load_label_png, load_rgb
from clips4.pipeline.safepath import check_name, output_path

__all__ = ["DAVIS_PALETTE", "register_embedder", "get_embedder", "run_davis", "evaluate_results_dir"]

DAVIS_PALETTE = voc_palette(256)


def _checkpoint_embedder(checkpoint=None, device=None, **_):
    from clips4.evaluate.sources import checkpoint_embedder

    return checkpoint_embedder(checkpoint, device)


_EMBEDDERS: dict[str, Callable[..., EmbedFn]] = {
    "color": lambda **kw: make_color_embedder(),
    "checkpoint": _checkpoint_embedder,
}


def register_embedder(name: str, factory: Callable[..., EmbedFn]) -> None:
    """Register an embedding source for ``--embedding NAME``: ``factory(checkpoint=Path|None, device=str)``
    returns ``embed(frame (H, W, 3) uint8) -> (h, w, D) float32`` (L2-normalised along D)."""
    _EMBEDDERS[name] = factory


def get_embedder(name: str, checkpoint: Path | None = None, device: str | None = None) -> EmbedFn:
    if name not in _EMBEDDERS:
        raise ValueError(f"unknown embedding {name!r}; valid: {', '.join(sorted(_EMBEDDERS))}")
    return _EMBEDDERS[name](checkpoint=checkpoint, device=device)


def _frames(ds: DavisDataset, name: str, limit_frames: int | None) -> tuple[list[ImageRecord], list[str]]:
    """The sequence's frames (sorted by name) and a note per frame whose annotation is missing."""
    recs = ds.sequence_records(name)
    if not recs:
        raise FileNotFoundError(f"DAVIS sequence {name!r}: no frames under {ds.root}/JPEGImages/480p/{name}")
    if limit_frames is not None:
        recs = recs[:limit_frames]
    if recs[0].gt_path is None:
        raise FileNotFoundError(f"DAVIS sequence {name}: no annotation for its first frame {recs[0].meta['frame']}.jpg "
                                f"(Annotations/480p/{name}/{recs[0].meta['frame']}.png); the first frame defines the objects")
    missing = [r.meta["frame"] for r in recs[1:] if r.gt_path is None]
    return recs, missing


def _score(recs: list[ImageRecord], preds: list[np.ndarray]) -> dict:
    """Scores of one sequence; frames without an annotation are listed in ``missing_annotations``, not scored."""
    gts = [load_label_png(r.gt_path) if r.gt_path else np.zeros_like(p) for r, p in zip(recs, preds)]
    res = evaluate_sequence(np.stack(gts), np.stack(preds), scored=np.array([r.gt_path is not None for r in recs]))
    res["missing_annotations"] = [r.meta["frame"] for r in recs[1:] if r.gt_path is None]
    return res


def run_davis(
    root: str | Path,
    out: str | Path,
    *,
    embed: EmbedFn | None = None,
    embedding: str = "color",
    checkpoint: Path | None = None,
    sequences: Sequence[str] | None = None,
    split: str = "val",
    n_context: int = 20,
    radius: float = 12.0,
    topk: int = 10,
    temperature: float = 0.07,
    limit_frames: int | None = None,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Propagate the first-frame masks of each sequence, write ``<out>/<seq>/<frame>.png`` (DAVIS palette) and
    ``<out>/sequences/<seq>.json`` as each sequence finishes (a rerun with the same settings skips finished
    sequences), then ``<out>/davis_results.json``; returns the results dict."""
    if limit_frames is not None and limit_frames < 3:
        raise ValueError("limit_frames must be >= 3: the first and last frames are not scored (DAVIS protocol)")
    ds = DavisDataset(str(root), split)
    out = Path(out)
    settings = {"root": ds.root, "embedding": embedding if embed is None else "custom",
                "checkpoint": str(checkpoint) if checkpoint else None, "split": split, "n_context": n_context,
                "radius": radius, "topk": topk, "temperature": temperature, "limit_frames": limit_frames}
    names = [check_name(n, what="sequence name") for n in sequences] if sequences else ds.sequences()
    say = progress or (lambda m: None)
    per_seq, timing, missing_gt = {}, {}, {}
    embed_fn = embed
    for name in names:
        seq_json = output_path(out, "sequences", f"{name}.json", what="DAVIS result")
        if seq_json.is_file():
            done = json.loads(seq_json.read_text())
            if done.get("settings") == settings:  # finished by an earlier run with the same settings
                per_seq[name], timing[name], missing_gt[name] = done["result"], done["seconds"], done["missing_gt"]
                say(f"{name}: already finished (J&F={done['result']['J&F']:.4f})")
                continue
        t0 = time.time()
        recs, missing = _frames(ds, name, limit_frames)
        if embed_fn is None:
            embed_fn = get_embedder(embedding, checkpoint, device)
        frames = (load_rgb(r.path) for r in recs)
        preds = []
        for r, mask in zip(recs, propagate_sequence(frames, load_label_png(recs[0].gt_path), embed_fn,
                                                     n_context=n_context, radius=radius, topk=topk,
                                                     temperature=temperature, device=device)):
            save_indexed_png(output_path(out, name, f"{r.meta['frame']}.png", what="DAVIS mask"), mask, DAVIS_PALETTE)
            preds.append(mask)
        per_seq[name] = _score(recs, preds)
        timing[name] = time.time() - t0
        missing_gt[name] = missing
        seq_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = seq_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": settings, "result": per_seq[name], "seconds": timing[name],
                                   "missing_gt": missing}, allow_nan=True))
        tmp.replace(seq_json)
        r = per_seq[name]
        say(f"{name}: J={r['J']:.4f} F={r['F']:.4f} J&F={r['J&F']:.4f} ({len(recs)} frames, {timing[name]:.1f}s)"
            + (f"; no annotation for frame(s) {', '.join(missing)}: not scored" if missing else ""))
    result = {
        "task": "davis2017-semi-supervised-propagation",
        "config": {**settings, "sequences": names},
        "sequences": per_seq,
        "global": summarize(per_seq),
        "seconds": timing,
        "frames_without_annotation": {k: v for k, v in missing_gt.items() if v},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "davis_results.json").write_text(json.dumps(result, indent=2, allow_nan=True))
    return result


def evaluate_results_dir(root: str | Path, results_dir: str | Path, sequences: Sequence[str] | None = None, *,
                         split: str = "val", max_frames: int | None = None) -> dict:
    """Score a DAVIS-layout results folder (``<results>/<seq>/<frame>.png``) against the dataset's annotations."""
    ds = DavisDataset(str(root), split)
    per_seq = {}
    for name in (list(sequences) if sequences else ds.sequences()):
        recs, _ = _frames(ds, name, max_frames)
        preds = [load_label_png(str(output_path(results_dir, name, f"{r.meta['frame']}.png", what="DAVIS mask"))) for r in recs]
        per_seq[name] = _score(recs, preds)
    return {"sequences": per_seq, "global": summarize(per_seq)}
