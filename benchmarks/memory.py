"""Peak memory of one large image in the segments and clip-features stages, with the per-item memory budget on.

Each measurement runs in a fresh process: build the stage's processor (default params; clip-features with a tiny
randomly initialised open_clip ViT, so no weights are needed — the image decode and resize dominate at these
sizes), then process ONE JPEG of the given size (smooth colour blocks plus noise, quality 90). Printed per
(stage, megapixels): peak RSS of the process (``VmHWM``), the part of it taken by the item (the high-water mark while
it ran, reset after the processor was built, minus the RSS then), the stage's working-set estimate and the budget, and the outcome (ok, or the
failure the budget recorded instead of an out-of-memory kill).

    python benchmarks/memory.py                       # 1, 25, 108 MP, budget: the default (available memory / workers)
    python benchmarks/memory.py --sizes 1,4 --budget-mb 4096
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[5])
stage, path, h, w = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
budget = None if sys.argv[6] == "auto" else int(sys.argv[6])
from clips4.pipeline.datasets import ImageRecord
from clips4.pipeline import limits

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
ctx = {"memory_budget_mb": budget, "num_workers": 1}
if stage == "segments":
    from clips4.pipeline.config import SegmentsParams
    from clips4.pipeline.processors import SegmentsProcessor
    proc = SegmentsProcessor(SegmentsParams(), ctx)
else:
    from conftest_clip import make_tiny_clip
    import tempfile
    tiny = make_tiny_clip(tempfile.mkdtemp())
    from clips4.pipeline.config import ClipFeaturesParams
    from clips4.pipeline.processors import ClipFeaturesProcessor
    params = ClipFeaturesParams.model_validate({"segment_source": "kmeans",
                                               "clip": {"model": tiny.name, "checkpoint": tiny.checkpoint}})
    proc = ClipFeaturesProcessor(params, ctx)
# ru_maxrss would count the parent's pages at fork: VmHWM is this program's own high-water mark; reset it (clear_refs
# 5) so that what follows is the item's peak
peak_build = status("VmHWM")
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
base = status("VmRSS")
t0 = time.perf_counter()
(res,) = proc([ImageRecord("big", path, None, None, h, w)])
item_peak = status("VmHWM")
out = {"seconds": time.perf_counter() - t0, "base": base, "peak": max(peak_build, item_peak), "item": item_peak - base,
       "error": res.error or "", "estimate": limits.working_set(stage, h, w), "budget": proc.memory_budget}
print("RESULT " + json.dumps(out))
"""


def make_jpeg(path: Path, mp: float, seed: int = 0) -> tuple[int, int]:
    """A 4:3 JPEG of ``mp`` megapixels with structure (blocks of colour + noise), built in strips (low memory)."""
    import numpy as np
    from PIL import Image

    w = int(round((mp * 1e6 * 4 / 3) ** 0.5))
    h = int(round(mp * 1e6 / w))
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 400), max(2, w // 400), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.NEAREST)
    arr = np.asarray(img).copy()
    for y in range(0, h, 1024):
        arr[y:y + 1024] = np.clip(arr[y:y + 1024].astype(np.int16) + rng.integers(-12, 12, arr[y:y + 1024].shape),
                                  0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return h, w


def measure(stage: str, path: Path, h: int, w: int, budget_mb: int | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", _CHILD, stage, str(path), str(h), str(w), str(REPO / "tests"),
                        "auto" if budget_mb is None else str(budget_mb)], capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"process ended with status {p.returncode}: {p.stderr.strip().splitlines()[-1:]}", "peak": 0,
            "item": 0, "base": 0, "estimate": 0, "budget": 0, "seconds": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,25,108", help="megapixels, comma-separated")
    ap.add_argument("--stages", default="segments,clip-features")
    ap.add_argument("--budget-mb", type=int, default=None, help="per-item budget (default: the stage's own default)")
    args = ap.parse_args()
    gib = 1 << 30
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mp in [float(s) for s in args.sizes.split(",")]:
            path = Path(tmp) / f"{mp:g}mp.jpg"
            h, w = make_jpeg(path, mp)
            for stage in args.stages.split(","):
                r = measure(stage.replace("-", "_"), path, h, w, args.budget_mb)
                outcome = "ok" if not r["error"] else ("refused by the budget" if "memory budget" in r["error"]
                                                       else r["error"][:60])
                rows.append((stage, f"{w}x{h} ({mp:g} MP)", f"{r['peak'] / gib:.2f}", f"{r['item'] / gib:.2f}",
                             f"{r['estimate'] / gib:.2f}", f"{(r['budget'] or 0) / gib:.2f}", f"{r['seconds']:.1f}", outcome))
                print(rows[-1], file=sys.stderr, flush=True)
    head = ("stage", "image", "peak RSS GiB", "item GiB", "estimate GiB", "budget GiB", "seconds", "outcome")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
