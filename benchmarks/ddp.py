"""Benchmark: DDP (torchrun, gloo on CPU) reaches the loss statistics of one process at the same global batch.

One process with batch ``B*W`` and ``torchrun --nproc_per_node W`` with batch ``B`` per rank train on the same
synthetic world from the same seed; the sampler gives both the same images and views at every step (rank ``r``
reads its own shard of the global batch). Printed: mean +- standard error of each logged loss over the last
``--last`` steps for both, and their difference in standard errors (goal: within noise, |z| < 3).

    nice -n 10 .venv/bin/python benchmarks/ddp.py [--steps 200] [--world 2] [--batch 8] [--n-train 64]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import STAGES, build_world, read_metrics  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--last", type=int, default=50)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global batch (images per step over all ranks)")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--out", default="/tmp/clips4-ddp-bench")
    a = ap.parse_args(argv)
    if a.batch % a.world:
        raise SystemExit("--batch must be a multiple of --world")
    base = Path(a.out)
    cfg = build_world(base / "world", a.n_train, 4)
    common = ["--stages", str(STAGES), "--config", str(cfg), "--quiet", "--restart",
              "--set", f"train.iterations={a.steps}", "--set", "train.device=cpu", "--set", "train.num_workers=1",
              "--set", f"train.checkpoint_every={a.steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    bindir = Path(sys.executable).parent
    runs = {
        f"1 process, batch {a.batch}": [str(bindir / "clips4"), "train", *common, "--set", f"train.batch_size={a.batch}",
                                        "--out", str(base / "single")],
        f"torchrun {a.world} x batch {a.batch // a.world}": [
            str(bindir / "torchrun"), "--nproc_per_node", str(a.world), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "clips4.cli", "train", *common,
            "--set", f"train.batch_size={a.batch // a.world}", "--out", str(base / "ddp")],
    }
    stats = {}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        out = Path(cmd[cmd.index("--out") + 1])
        rows = read_metrics(out)[-a.last:]
        stats[name] = {k: np.array([r[k] for r in rows]) for k in ("total", "L_t", "L_e", "L_s", "L_u")}
        print(f"{name}: {a.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    (n1, s1), (n2, s2) = stats.items()
    print(f"\nmean +- s.e. over the last {a.last} of {a.steps} steps (synthetic world, {a.n_train} images)")
    print(f"  {'loss':<6} {n1:>26} {n2:>26}   diff / s.e.")
    worst = 0.0
    for k in s1:
        m1, m2 = s1[k].mean(), s2[k].mean()
        e1, e2 = s1[k].std(ddof=1) / np.sqrt(len(s1[k])), s2[k].std(ddof=1) / np.sqrt(len(s2[k]))
        z = (m2 - m1) / max(np.hypot(e1, e2), 1e-12)
        if k == "total":
            worst = abs(z)
        print(f"  {k:<6} {m1:>17.4f} +- {e1:.4f} {m2:>17.4f} +- {e2:.4f}   {z:+.2f}")
    print(f"\ntotal loss: |diff| = {worst:.2f} s.e. -> {'within noise' if worst < 3 else 'DIFFERENT'} (goal < 3)")
    (base / "ddp_stats.json").write_text(json.dumps({n: {k: float(v.mean()) for k, v in s.items()} for n, s in stats.items()}))
    return 0 if worst < 3 else 1


if __name__ == "__main__":
    sys.exit(main())
