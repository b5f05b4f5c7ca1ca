"""Benchmark: the training loop does not wait for data, and its memory does not grow.

Tiny model on CPU with 2 DataLoader workers on a synthetic world (its caches are built first). Reported, from
``metrics.jsonl``: the time each step waited for its batch (``data_s``) as a share of the step period
(``step_s``), over the steps after a short warm-up (target <= 5 %), and the resident memory (RSS) of the
training process at step 50 and at step 500 (target: within 5 %); the loader workers' RSS is shown beside it.

Defaults are the bundled synthetic config's batch 8 / crop 96. With much smaller steps (e.g. batch 4, crop 64:
~0.15 s/step) the two workers cannot keep up on a 2-core machine: each view's colour jitter (torchvision's
RGB->HSV->RGB hue shift) costs ~30-40 ms, so the loader, not the loop, is then the bottleneck (~9 % wait).

    .venv/bin/python benchmarks/train.py [--iterations 500] [--batch-size 8] [--crop 96] [--workers 2]
        [--n-train 32] [--work DIR]

``--data-only``: the trainer's data path alone (no model): the real CachedViews + DataLoader at the paper's crop
(321) and batch (8) on 500x375 images, images per second with 0, 1 and 2 loader workers, per worker, and the
workers one GPU needs for 200 images/s at that rate.

    .venv/bin/python benchmarks/train.py --data-only [--batches 30] [--n-train 32]
"""
from __future__ import annotations

import argparse

import numpy as np
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RSSSampler, build_world, load, log, read_metrics  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--early", type=int, default=50, help="the step whose RSS is the reference")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the data-wait share")
    ap.add_argument("--batch-size", type=int, default=8, help="default: the bundled synthetic config's")
    ap.add_argument("--crop", type=int, default=96, help="default: the bundled synthetic config's")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--data-only", action="store_true", help="the data path alone, at the paper's crop and batch")
    ap.add_argument("--batches", type=int, default=30, help="--data-only: batches timed per worker count")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="clips4-bench-train-"))
    log(f"work folder: {work}")
    if a.data_only:
        return data_only(work, a)
    cfg_path = build_world(work, a.n_train, 2)

    from clips4.trainer.train import train

    out = work / f"run-{time.strftime('%H%M%S')}"
    cfg = load(cfg_path, f"train.iterations={a.iterations}", f"train.batch_size={a.batch_size}",
               f"train.crop_size={a.crop}", f"train.num_workers={a.workers}", "train.device=cpu",
               f"train.checkpoint_every={max(100, a.iterations // 5)}", f"train.out={json.dumps(str(out))}")
    t0 = time.perf_counter()
    with RSSSampler(out / "metrics.jsonl", [a.early, a.iterations - 1, a.iterations]) as rss:
        res = train(cfg, restart=True, show_progress=False)
    wall = time.perf_counter() - t0
    rows = read_metrics(out)
    assert len(rows) == a.iterations == res.step

    steady = rows[a.warmup:]
    data = sum(r["data_s"] for r in steady)
    step = sum(r["step_s"] for r in steady)
    share = data / step
    med = statistics.median(r["data_s"] / r["step_s"] for r in steady)
    worst = max(steady, key=lambda r: r["data_s"])
    first = rows[0]["data_s"]
    print(f"training: {a.iterations} steps, batch {a.batch_size} (x2 views), crop {a.crop}, {a.workers} loader workers, "
          f"tiny backbone on CPU; {wall:.0f} s wall, {step / len(steady):.3f} s/step")
    print(f"data wait: {100 * share:.2f} % of step time over steps {a.warmup}..{a.iterations - 1} "
          f"(median per step {100 * med:.2f} %, worst step {worst['step']}: {worst['data_s']:.3f} s of "
          f"{worst['step_s']:.3f} s; first batch {first:.2f} s incl. worker start)")
    print(f"  target <= 5 %: {'MET' if share <= 0.05 else 'NOT MET'}")

    (m0, k0), (m1, _) = rss.samples.get(a.early, (0, 0)), rss.samples.get(a.iterations, (0, 0))
    k1 = rss.samples.get(a.iterations - 1, (0, 0))[1]  # the loader workers may be gone after the last step
    if not m0 or not m1:
        print(f"RSS: not sampled (samples: {rss.samples})")
        return 1
    drift = (m1 - m0) / m0
    mib = 1 / 2**20
    print(f"RSS of the training process: step {a.early} {m0 * mib:.1f} MiB, step {a.iterations} {m1 * mib:.1f} MiB "
          f"({100 * drift:+.2f} %); loader workers together: step {a.early} {k0 * mib:.1f} MiB, step {a.iterations - 1} {k1 * mib:.1f} MiB "
          f"({100 * (k1 - k0) / max(k0, 1):+.2f} %)")
    print(f"  target within 5 %: {'MET' if abs(drift) <= 0.05 else 'NOT MET'}")
    return 0 if share <= 0.05 and abs(drift) <= 0.05 else 1


def data_only(work: Path, a) -> int:
    """Images/s of the training data path (decode, crop, both views' augmentation, collate) without a model."""
    import torch

    from clips4.pipeline.stage import dataset_from_config, open_stage
    from clips4.trainer.data import StepSampler, make_loader
    from clips4.trainer.train import training_views

    cfg_path = build_world(work, a.n_train, 2, image_size=(375, 500))
    cfg = load(cfg_path, "train.crop_size=321", "train.batch_size=8")
    ds = dataset_from_config(cfg)
    deps = {s: open_stage(cfg, s, ds).url for s in ("segments", "clip_features", "prototypes")}
    views = training_views(cfg, ds, deps)
    batch = 8
    rates = {}
    for workers in (0, 1, 2):
        sampler = StepSampler(len(views), batch, 0, 0, a.batches + 2, 0, 1)
        it = iter(make_loader(views, sampler, workers, pin_memory=False, generator=torch.Generator().manual_seed(0)))
        next(it), next(it)  # worker start-up and first batches are not the steady rate
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        rates[workers] = n * batch / (time.perf_counter() - t0)
        del it
    per_worker = rates[1]
    print(f"trainer data path (no model), crop 321, batch {batch}, 500x375 images, two views each:")
    for w, r in rates.items():
        print(f"  {w} loader worker{'s' if w != 1 else ''}{' (in the training process)' if w == 0 else ''}: "
              f"{r:.1f} images/s")
    print(f"  per worker: {per_worker:.1f} images/s; 2 workers give {rates[2] / per_worker:.2f}x one")
    need = int(np.ceil(200 / per_worker))
    print(f"  workers needed to feed 200 images/s (one fast GPU at the paper's batch): {need} "
          f"(at this machine's per-core speed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
