"""Benchmark: the whole pipeline on 1k, 10k and 100k small synthetic images, in bounded memory.

Per size N: write a synthetic world of N training images (``--image-size``, default 32x48), then run, as
``clips4`` does, the segments stage and the clip-features stage (synthetic teacher) over Ray workers, the
prototypes stage, and ``--steps`` training steps whose sampler draws from all N images; then ``cache ls``.
Printed per size: images/s of every stage, seconds per 1000 images, peak resident memory of every kind of
process (this driver, Ray's workers and daemons, DataLoader workers; sampled from /proc over the process tree),
cache size on disk, and the times of the dataset listing, each index commit, the prototype search and
``cache ls``. At the end, per-image costs relative to the smallest size (goal: within 20 %).

``--coco`` adds the prototype search at COCO-Stuff scale (5M x 512 segments, 171 classes, m = 32, streamed
from Parquet) via ``benchmarks/prototypes.py`` in a child process, with its wall time and peak RSS.

    nice -n 10 .venv/bin/python benchmarks/scale.py --sizes 1000,10000 [--out /tmp/clips4-scale] [--coco]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BackgroundSampler, child_pids, rss_bytes  # noqa: E402  (what the benchmarks share)

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages.yaml"
GiB = 2**30


# ------------------------------------------------------------------------------------------ process tree
def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _kind(pid: int, root: int, phase: str) -> str:
    if pid == root:
        return "driver"
    cmd = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
    if "ray::" in cmd or "default_worker.py" in cmd:
        return "ray worker"
    if "raylet" in cmd or "gcs_server" in cmd or "/ray/" in cmd or "ray/_private" in cmd:
        return "ray daemons"
    if phase == "train":
        return "loader worker"
    return "other child"


class TreeRSS(BackgroundSampler):
    """Peak RSS per process kind over the process tree of this driver, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.25):
        self.period, self.phase = period, "setup"
        self.peak: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # phase -> kind -> bytes
        self.count: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
        super().__init__()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            phase = self.phase
            for pid in [me, *child_pids(me)]:
                kind = _kind(pid, me, phase)
                self.peak[phase][kind] = max(self.peak[phase][kind], rss_bytes(pid))
                self.count[phase][kind].add(pid)
            self._stop.wait(self.period)


# ------------------------------------------------------------------------------------------------ world
def _write_range(args) -> int:
    root, lo, hi, hw = args
    from PIL import Image

    from clips4.synthetic import SyntheticWorld

    w = SyntheticWorld(image_size=hw)
    d = Path(root) / "images" / "train"
    for i in range(lo, hi):
        img, _ = w.sample(i, "train")
        Image.fromarray(img).save(d / f"{i // 1000:04d}" / f"{i:07d}.png", compress_level=1)
    return hi - lo


def write_world(root: Path, n: int, hw: tuple[int, int], procs: int, unique: int = 0) -> float:
    """N training images in folders of 1000 (as large datasets are laid out), no masks; seconds taken.
    ``unique`` > 0: only the first that many are rendered, image i is a byte copy of image ``i % unique`` (a
    different name and file: every stage still reads, computes and stores it; rendering 100k images alone takes
    about an hour on 2 cores)."""
    marker = root / (f".written-{n}-{hw[0]}x{hw[1]}" + (f"-u{unique}" if 0 < unique < n else ""))
    if marker.exists():
        return 0.0
    from clips4.synthetic import SyntheticWorld

    t0 = time.perf_counter()
    for k in range((n + 999) // 1000):
        (root / "images" / "train" / f"{k:04d}").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(SyntheticWorld().class_names) + "\n")
    m = min(n, unique) if unique > 0 else n
    chunks = [(str(root), lo, min(m, lo + 2000), hw) for lo in range(0, m, 2000)]
    with ProcessPoolExecutor(procs) as ex:
        assert sum(ex.map(_write_range, chunks)) == m
    d = root / "images" / "train"
    if m < n:
        blobs = [(d / f"{i // 1000:04d}" / f"{i:07d}.png").read_bytes() for i in range(m)]
        for i in range(m, n):
            (d / f"{i // 1000:04d}" / f"{i:07d}.png").write_bytes(blobs[i % m])
    marker.write_text("ok")
    return time.perf_counter() - t0


def world_config(base: Path, root: Path, hw: tuple[int, int], a) -> Path:
    text = resources.files("clips4.data").joinpath("configs", "synthetic.yaml").read_text()
    text = text.replace("cache_root: outputs/synthetic-world/cache", f"cache_root: {base / 'cache'}")
    text = text.replace("root: outputs/synthetic-world", f"root: {root}")
    text = text.replace("classes: outputs/synthetic-world/classes.txt", f"classes: {root / 'classes.txt'}")
    text = text.replace("image_size: [96, 128]", f"image_size: [{hw[0]}, {hw[1]}]")
    text = text.replace("executor: local ", f"executor: {a.executor} ")
    text = text.replace("batch_size: 16", f"batch_size: {a.batch_size}\n  num_workers: {a.workers}")
    cfg = base / "scale.yaml"
    cfg.write_text(text)
    return cfg


# ------------------------------------------------------------------------------------------------- timing
class Timed:
    """Wraps a function or method (by module attribute) and accumulates its wall time."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, 0
        self.orig = getattr(owner, name)
        timed = self

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return timed.orig(*a, **k)
            finally:
                timed.seconds += time.perf_counter() - t0
                timed.calls += 1

        setattr(owner, name, wrapper)

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def run_size(n: int, a, base_root: Path) -> dict:
    import numpy as np

    from clips4.pipeline import cache as cache_mod
    from clips4.pipeline import prototypes as protos_mod
    from clips4.pipeline.cache import list_stage_outputs
    from clips4.pipeline.config import load_config
    from clips4.pipeline.stage import dataset_from_config, run_stage

    hw = tuple(int(x) for x in a.image_size.split("x"))
    base = base_root / f"n{n}"
    root = base / "world"
    gen_s = write_world(root, n, hw, procs=a.workers, unique=a.unique)
    cfg_path = world_config(base, root, hw, a)
    train_out = base / "train"
    sets = [f"train.iterations={a.steps}", f"train.batch_size={a.train_batch}", f"train.crop_size={min(hw)}",
            f"train.num_workers={a.workers}", f"train.checkpoint_every={max(1, a.steps // 2)}",
            f"train.out={json.dumps(str(train_out))}"]
    cfg = load_config(STAGES, [cfg_path], sets)
    res: dict = {"n": n, "generate_s": gen_s}
    commit = Timed(cache_mod.StageWriter, "commit")
    search = Timed(protos_mod, "known_prototypes")
    with TreeRSS() as rss:
        t0 = time.perf_counter()
        ds = dataset_from_config(cfg)
        recs = ds.records()
        res["listing_s"] = time.perf_counter() - t0
        assert len(recs) == n, (len(recs), n)
        for stage in ("segments", "clip_features"):
            rss.phase = stage
            run = run_stage(cfg, stage, dataset=ds, show_progress=False)
            if run.failed:
                raise SystemExit(f"{stage}: {len(run.failed)} images failed, e.g. {run.failed[:3]}")
            res[f"{stage}_s"] = run.seconds
            res[f"{stage}_commit_s"] = commit.take()
            res[f"{stage}_processed"] = run.processed
        rss.phase = "prototypes"
        t0 = time.perf_counter()
        run_stage(cfg, "prototypes", dataset=ds, show_progress=False)
        res["prototypes_s"] = time.perf_counter() - t0
        res["prototype_search_s"] = search.take()
        rss.phase = "train"
        from clips4.trainer.train import train

        t0 = time.perf_counter()
        tr = train(cfg, dataset=ds, restart=True, show_progress=False, publish=False)
        res["train_s"] = time.perf_counter() - t0
        res["train_steps"] = len(tr.losses)
        res["train_data_wait"] = float(np.mean([r["data_s"] for r in tr.losses])) if tr.losses else 0.0
        rss.phase = "cache ls"
        t0 = time.perf_counter()
        rows = list_stage_outputs(str(base / "cache"))
        res["list_outputs_s"] = time.perf_counter() - t0
        assert sum(r["images"] for r in rows if r["stage"] == "segments") == n
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("clips4")), "cache", "ls", "--stages", str(STAGES),
                    "--cache", str(base / "cache")], check=True, stdout=subprocess.DEVNULL)
    res["cache_ls_cli_s"] = time.perf_counter() - t0
    res["cache_bytes"] = du(base / "cache")
    res["peak_rss"] = {ph: dict(kinds) for ph, kinds in rss.peak.items()}
    res["processes"] = {ph: {k: len(v) for k, v in kinds.items()} for ph, kinds in rss.count.items()}
    from clips4.pipeline.stage import stage_url

    url = stage_url(cfg, "segments", ds)[0]
    res["parts"] = len(os.listdir(Path(url) / "parts")) // 2
    return res


def report(res: dict, a) -> None:
    n = res["n"]
    print(f"\n=== {n:,} images ({a.image_size}), Ray workers {a.workers}, batch {a.batch_size} "
          f"({res['parts']:,} parts per stage), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    uniq = f", {a.unique:,} distinct images, the rest byte copies" if 0 < a.unique < n else ""
    print(f"  generate world {res['generate_s']:.1f} s (not counted{uniq})")
    print(f"  dataset listing (+ image headers)  {res['listing_s']:8.2f} s   {1e3 * res['listing_s'] / n:7.3f} ms/img")
    for st in ("segments", "clip_features"):
        s = res[f"{st}_s"]
        print(f"  {st:<14} {n / s:8.1f} img/s  {1e3 * s / n:7.3f} ms/img   (index commit {res[f'{st}_commit_s']:.2f} s)")
    print(f"  prototypes     {res['prototypes_s']:8.2f} s total, search {res['prototype_search_s']:.2f} s  "
          f"{1e3 * res['prototypes_s'] / n:7.3f} ms/img")
    ts = res["train_s"]
    print(f"  train          {res['train_steps']} steps in {ts:.1f} s = {res['train_steps'] / ts:.2f} it/s "
          f"({a.train_batch * res['train_steps'] / ts:.1f} img/s, mean data wait {1e3 * res['train_data_wait']:.1f} ms)")
    print(f"  cache ls       {res['list_outputs_s']:.2f} s in-process, {res['cache_ls_cli_s']:.2f} s as `clips4 cache ls`")
    print(f"  cache on disk  {res['cache_bytes'] / 2**20:.1f} MiB ({res['cache_bytes'] / n / 1024:.2f} KiB/img)")
    print("  peak RSS per process (MiB) by phase and kind [number of processes]:")
    for ph, kinds in res["peak_rss"].items():
        cells = ", ".join(f"{k} {v / 2**20:.0f} [{res['processes'][ph][k]}]" for k, v in sorted(kinds.items()))
        print(f"    {ph:<14} {cells}")
    worst = max(v for kinds in res["peak_rss"].values() for v in kinds.values())
    print(f"  largest process: {worst / GiB:.2f} GiB (goal < 4 GiB) {'OK' if worst < 4 * GiB else 'MISSED'}")
    sys.stdout.flush()


def compare(results: list[dict]) -> None:
    if len(results) < 2:
        return
    ref = results[0]
    print(f"\n=== per-image cost relative to {ref['n']:,} images (goal: within 20 %)")
    keys = [("listing", "listing_s"), ("segments", "segments_s"), ("clip_features", "clip_features_s"),
            ("prototypes", "prototypes_s"), ("index commits", None)]
    for label, key in keys:
        vals = []
        for r in results:
            v = r[key] if key else r["segments_commit_s"] + r["clip_features_commit_s"]
            vals.append(v / r["n"])
        base = vals[0] or 1e-12
        print(f"  {label:<14} " + "  ".join(f"{r['n']:>7,}: {1e3 * v:7.3f} ms ({v / base:5.2f}x)"
                                             for r, v in zip(results, vals)))
    tr = [r["train_s"] / max(1, r["train_steps"]) for r in results]
    print("  train step     " + "  ".join(f"{r['n']:>7,}: {t:6.3f} s ({t / tr[0]:5.2f}x)" for r, t in zip(results, tr)))
    print("  cache ls       " + "  ".join(f"{r['n']:>7,}: {r['cache_ls_cli_s']:.2f} s" for r in results) + "  (goal < 5 s)")


def coco(a) -> None:
    """The prototype search at COCO-Stuff scale, in a child process (so its peak RSS is its own)."""
    print(f"\n=== prototype search at COCO-Stuff scale: {a.coco_n:,} x 512, 171 classes, m = 32, streamed from Parquet")
    sys.stdout.flush()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "prototypes.py"), "--n", str(a.coco_n),
                    "--target-s", "45", "--target-gib", "2"], check=True)
    print(f"  (whole benchmark incl. writing the Parquet file: {time.perf_counter() - t0:.0f} s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated image counts")
    ap.add_argument("--out", default="/tmp/clips4-scale", help="folder for the worlds and caches (reused)")
    ap.add_argument("--image-size", default="32x48", help="HxW of the synthetic images")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers and DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=32, help="images per Ray task = per cache part")
    ap.add_argument("--executor", default="ray", choices=("ray", "local"))
    ap.add_argument("--unique", type=int, default=0,
                    help="render only this many distinct images, the rest byte copies under their own names (0 = all)")
    ap.add_argument("--steps", type=int, default=200, help="training steps")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--coco", action="store_true", help="also the 5M-segment prototype search")
    ap.add_argument("--coco-n", type=int, default=5_000_000)
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    base = Path(a.out)
    results = []
    for n in [int(x) for x in a.sizes.split(",") if x.strip()]:
        res = run_size(n, a, base)
        report(res, a)
        results.append(res)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    compare(results)
    if a.coco:
        coco(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
