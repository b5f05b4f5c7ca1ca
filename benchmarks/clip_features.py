"""Benchmark: the clip-features stage runs at >= 85 % of the throughput of a bare batched forward of its model.

Model: an open_clip ViT (width 256, 6 layers, patch 16, native 224) with random weights, built here and saved to
a file (config JSON + state dict), so no network or hub is needed. Images: the first ``--n`` (32) JPEGs of
``../shared/data/VOC2012`` (skipped with a message when absent), copied into a folder dataset.

- bare: ``OpenClipBackend(...).dense_features(images)`` on the already-decoded images, windows batched across
  images (``batch_size`` windows per forward), after one warm-up call;
- stage: ``clips4 precompute clip-features`` in this process with ``--executor local`` and with ``--executor
  ray --num-workers 1``, on a fresh cache each time. Its steady throughput is measured between the first and
  the last part written (``ray.batch_size`` images per part): model loading and Ray start-up are one-time
  costs and are reported separately as the end-to-end figure. Per-part work counted: decode, forward, CLIP
  segments (k-means), segment embeddings, writing Zarr + Parquet.

Both use the same number of torch threads (``--threads``; the stage's ``ray.num_cpus``).

    .venv/bin/python benchmarks/clip_features.py [--n 32] [--batch-size 4] [--threads 2] [--executors local,ray]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOC = REPO.parent / "shared" / "data" / "VOC2012" / "JPEGImages"
ARCH = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "layers": 6, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def make_model(dst: Path) -> tuple[Path, Path]:
    """(config JSON, state-dict file) of a random-init ViT registered with open_clip as ``bench-vit256``."""
    import open_clip
    import torch

    cfg = dst / "bench-vit256.json"
    cfg.write_text(json.dumps(ARCH))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("bench-vit256", pretrained=None, device="cpu")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    ckpt = dst / "bench-vit256.pt"
    torch.save(model.state_dict(), ckpt)
    return cfg, ckpt


def part_rate(url: str, n_first: int) -> tuple[float, int]:
    """(images/s between the first and last part written, number of parts). ``n_first``: images in the first part."""
    parts = sorted(Path(url, "parts").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(parts) < 2:
        return float("nan"), len(parts)
    import pyarrow.parquet as pq

    n = sum(pq.read_metadata(p).num_rows for p in parts[1:])
    return n / (parts[-1].stat().st_mtime - parts[0].stat().st_mtime), len(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4, help="images per stage part (ray.batch_size)")
    ap.add_argument("--windows", type=int, default=16, help="windows per forward pass (clip.batch_size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--executors", default="auto,local,ray", help="auto: the default (2 workers asked; small runs stay in the process)")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    if not VOC.is_dir():
        print(f"skipped: {VOC} not present (the VOC2012 sample lives in ../shared/data beside the repo)")
        return 0
    files = sorted(VOC.glob("*.jpg"))[: a.n]
    if len(files) < a.n:
        print(f"note: only {len(files)} images in {VOC}")
    work = a.work or Path(tempfile.mkdtemp(prefix="clips4-bench-clip-"))
    imgs = work / "images"
    imgs.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, imgs / f.name)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import numpy as np
    import torch

    from clips4.cli import main as cli
    from clips4.pipeline.clip.backend import OpenClipBackend
    from clips4.pipeline.images import load_rgb

    cfg_json, ckpt = make_model(work)
    torch.set_num_threads(a.threads)
    backend = OpenClipBackend("bench-vit256", str(ckpt), device="cpu", batch_size=a.windows)
    images = [load_rgb(str(f)) for f in files]
    backend.dense_features(images[:1])  # warm-up
    t0 = time.perf_counter()
    feats = backend.dense_features(images)
    bare_s = time.perf_counter() - t0
    bare = len(images) / bare_s
    grid = feats[0].shape
    print(f"model: open_clip ViT width 256, 6 layers, patch 16, random weights; {len(images)} VOC images "
          f"(short side 448, 224 windows, stride 112; first grid {grid[:2]}); CPU, {a.threads} torch threads")
    print(f"bare dense_features on decoded images: {bare_s:.1f} s, {bare:.2f} img/s")
    sys.stdout.flush()

    ok = True
    for ex in [e.strip() for e in a.executors.split(",") if e.strip()]:
        cache = work / f"cache-{ex}"
        shutil.rmtree(cache, ignore_errors=True)
        args = ["precompute", "clip-features", "--stages", str(REPO / "stages.yaml"), "--dataset", "folder",
                "--root", str(imgs), "--cache", str(cache), "--clip-model", str(cfg_json), "--clip-checkpoint",
                str(ckpt), "--executor", ex, "--batch-size", str(a.batch_size), "--quiet",
                *(["--num-workers", "2"] if ex == "auto" else []),
                "--set", f"ray.num_cpus={a.threads}", "--set", "clip_features.clip.device=cpu",
                "--set", f"clip_features.clip.batch_size={a.windows}"]
        if ex == "ray":
            args += ["--num-workers", "1"]
        t0 = time.perf_counter()
        code = cli(args)
        wall = time.perf_counter() - t0
        if code:
            print(f"stage ({ex}) failed with exit status {code}")
            ok = False
            continue
        (url,) = [str(p) for p in cache.glob("*/clip_features/*") if (p / "index.parquet").exists()]
        rate, n_parts = part_rate(url, a.batch_size)
        ratio = rate / bare
        ok &= ratio >= 0.85
        print(f"stage, executor {ex}{' (1 worker)' if ex == 'ray' else ''}: steady {rate:.2f} img/s over {n_parts} parts "
              f"= {100 * ratio:.0f} % of bare (target >= 85 %: {'MET' if ratio >= 0.85 else 'NOT MET'}); end to end "
              f"{wall:.1f} s = {len(images) / wall:.2f} img/s incl. model load{' and Ray start' if ex == 'ray' else ''}"
              f" ({100 * (wall / bare_s - 1):+.0f} % over the bare forward's {bare_s:.1f} s)")
        sys.stdout.flush()
        from clips4.pipeline.cache import StageReader

        r = StageReader(url)
        got = r.get(r.image_ids[0], "features").astype(np.float32)
        want = feats[[f.stem for f in files].index(r.image_ids[0])]
        assert got.shape == want.shape and np.abs(got - want).max() < 2e-2, "stage features differ from the bare forward"
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
