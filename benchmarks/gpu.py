"""Benchmark: the GPU paths in one command (at most ~8 minutes on one GPU), or all of them on CPU with --dry-run.

Printed, one line each, then a table:
  1. the CLIP stage's images/s (fp32 and fp16 autocast) through the stage's own backend (OpenClipBackend,
     dense_features, sliding windows) on 500x375 images; ViT-B-16 with random weights written to a temporary
     file (throughput does not depend on the weights; no download is needed);
  2. the trainer's images/s with AMP and the real loader (CachedViews + DataLoader workers) on a synthetic world
     at the paper's batch, and the share of step time spent waiting for data;
  3. FAISS on GPU against FAISS on CPU (flat inner product, top-32): the same neighbours;
  4. the CUDA prototype search (known_prototypes(device="cuda")) against the CPU one: the same prototypes;
  5. one DDP step with SyncBatchNorm (a process group of this one process).

--dry-run runs every one of these code paths on the CPU with tiny sizes (a tiny CLIP, a few steps, the CPU
index on both sides), so the script cannot rot where there is no GPU; its figures mean nothing.

    .venv/bin/python benchmarks/gpu.py [--dry-run] [--images 64] [--steps 60] [--workers 4]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_world, load, log, read_metrics  # noqa: E402

#: a CLIP small enough for CPU (the dry run); the real run uses open_clip's ViT-B-16 config
TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _random_clip(work: Path, dry: bool) -> tuple[str, str]:
    """(model name or config file, checkpoint file) of a randomly initialised CLIP, for throughput only."""
    import open_clip
    import torch

    if dry:
        cfg = work / "clips4-bench-tiny.json"
        cfg.write_text(json.dumps(TINY_VIT))
        open_clip.add_model_config(cfg)
        name = "clips4-bench-tiny"
    else:
        name = "ViT-B-16"
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    ck = work / f"{name}-random.pt"
    torch.save(model.state_dict(), ck)
    return (str(cfg) if dry else name), str(ck)


def clip_throughput(work: Path, device: str, dry: bool, n_images: int) -> dict:
    from clips4.pipeline.clip.backend import OpenClipBackend

    model, ck = _random_clip(work, dry)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (375, 500, 3), dtype=np.uint8) for _ in range(n_images)]
    out = {}
    for precision in ("fp32", "fp16"):
        if precision == "fp16" and not device.startswith("cuda"):
            out[precision] = None  # autocast fp16 is a CUDA path
            continue
        kw = dict(short_side=64, window=64, stride=32) if dry else {}
        backend = OpenClipBackend(model, None, checkpoint=ck, device=device, precision=precision, batch_size=16, **kw)
        backend.dense_features(images[:2])  # warm-up (kernels, allocator)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(images), 8):
            feats = backend.dense_features(images[i:i + 8])
        _sync(device)
        out[precision] = len(images) / (time.perf_counter() - t0)
        assert feats[0].ndim == 3
    return out


def trainer_throughput(work: Path, device: str, dry: bool, steps: int, workers: int) -> dict:
    from clips4.trainer.train import train

    world = build_world(work / "world", 8 if dry else 64, 2, image_size=(96, 128) if dry else (375, 500))
    out = work / "run"
    sets = [f"train.iterations={steps}", f"train.num_workers={workers}", f"train.device={device}",
            "train.amp=" + json.dumps("on" if device.startswith("cuda") else "off"), f"train.out={json.dumps(str(out))}",
            f"train.checkpoint_every={steps + 1}", "train.calibration=none", "train.backbone_weights=random"]
    if dry:
        sets += ["train.batch_size=2", "train.crop_size=64", "train.backbone=tiny"]
    else:
        sets += ["train.batch_size=8", "train.crop_size=321", "train.backbone=resnet50"]
    cfg = load(world, *sets)
    t0 = time.perf_counter()
    train(cfg, restart=True, show_progress=False)
    wall = time.perf_counter() - t0
    rows = read_metrics(out)[min(5, max(0, steps - 2)):]
    step_s = sum(r["step_s"] for r in rows) / len(rows)
    wait = sum(r["data_s"] for r in rows) / max(1e-9, sum(r["step_s"] for r in rows))
    batch = cfg.params("train").batch_size
    return {"images_per_s": batch / step_s, "views_per_s": 2 * batch / step_s, "data_wait": wait, "wall_s": wall}


def faiss_equal(device: str, dry: bool) -> tuple[bool, str]:
    import faiss

    rng = np.random.default_rng(1)
    n, d, q = (5_000, 64, 50) if dry else (200_000, 512, 1_000)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(n, q, replace=False)] + 0.01 * rng.standard_normal((q, d)).astype(np.float32)
    cpu = faiss.IndexFlatIP(d)
    cpu.add(xb)
    d_cpu, i_cpu = cpu.search(xq, 32)
    if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        other = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(d))
        where = "GPU"
    else:
        other = faiss.IndexFlatIP(d)  # the dry run (or faiss-cpu on a GPU machine): the comparison itself runs
        where = "CPU (no FAISS GPU here)"
    other.add(xb)
    d_o, i_o = other.search(xq, 32)
    # equal neighbours; where two scores tie within float error the order may differ, so compare the sets too
    same = bool(np.array_equal(i_cpu, i_o) or all(set(a) == set(b) for a, b in zip(i_cpu, i_o)))
    return same and bool(np.allclose(d_cpu, d_o, atol=1e-4)), where


def prototypes_equal(device: str, dry: bool) -> bool:
    from clips4.pipeline.prototypes import known_prototypes

    rng = np.random.default_rng(2)
    n, d, k = (4_000, 32, 12) if dry else (300_000, 512, 171)
    e = rng.standard_normal((n, d)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    t = rng.standard_normal((k, d)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    batches = [(np.arange(i, min(n, i + 8192)), e[i:i + 8192]) for i in range(0, n, 8192)]
    p_cpu, s_cpu = known_prototypes(batches, t, 100.0, top_m=32)
    p_dev, s_dev = known_prototypes(batches, t, 100.0, top_m=32, device=device)  # the torch path, on CPU in a dry run
    return bool(np.array_equal(s_cpu, s_dev) and np.array_equal(p_cpu, p_dev))


def ddp_syncbn_step(device: str, dry: bool) -> float:
    import torch
    import torch.distributed as dist

    from clips4.trainer.model import ModelConfig, build_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        model = build_model(ModelConfig(backbone="tiny" if dry else "resnet50", embed_dim=32 if dry else 512,
                                        backbone_weights="random", head_dim=16 if dry else 512))
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))  # it converts in place
        n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        # DDP takes SyncBatchNorm on GPU modules only: the dry run converts (above) and steps with plain BatchNorm
        model = (synced if device.startswith("cuda") else model).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.device(device).index or 0]
                                                        if device.startswith("cuda") else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
        x = torch.randn(2 if dry else 8, 3, 64 if dry else 321, 64 if dry else 321, device=device)
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=device.startswith("cuda")):
            z = ddp(x)
        loss = z.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        assert n_sync > 0 and torch.isfinite(loss)
        return time.perf_counter() - t0
    finally:
        dist.destroy_process_group()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every code path on the CPU with tiny sizes (no GPU needed)")
    ap.add_argument("--images", type=int, default=64, help="images for the CLIP stage's throughput")
    ap.add_argument("--steps", type=int, default=60, help="training steps")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of the training run")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to exercise the code paths on the CPU")
        return 2
    device = "cpu" if dry else "cuda"
    name = "CPU (dry run: figures mean nothing)" if dry else torch.cuda.get_device_name(0)
    work = a.work or Path(tempfile.mkdtemp(prefix="clips4-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"device: {name}; work folder: {work}")
    t_all = time.perf_counter()
    rows = []
    clip = clip_throughput(work, device, dry, 4 if dry else a.images)
    for prec, v in clip.items():
        rows.append((f"CLIP stage, {prec}, 500x375 images", "not run (CUDA only)" if v is None else f"{v:.1f} images/s"))
    log("CLIP stage done")
    tr = trainer_throughput(work, device, dry, 3 if dry else a.steps, 0 if dry else a.workers)
    rows.append((f"trainer, AMP {'on' if not dry else 'off'}, real loader ({0 if dry else a.workers} workers)",
                 f"{tr['images_per_s']:.1f} images/s ({tr['views_per_s']:.1f} views/s), data wait {100 * tr['data_wait']:.1f} %"))
    log("trainer done")
    same, where = faiss_equal(device, dry)
    rows.append((f"FAISS {where} vs CPU, top-32", "equal" if same else "DIFFERENT"))
    proto = prototypes_equal(device, dry)
    rows.append((f"prototype search on {device} vs CPU", "equal" if proto else "DIFFERENT"))
    step = ddp_syncbn_step(device, dry)
    rows.append(("one DDP step with SyncBatchNorm", f"{step:.2f} s"))
    print(f"\n| {'on ' + name} | figure |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    return 0 if same and proto else 1


if __name__ == "__main__":
    raise SystemExit(main())
