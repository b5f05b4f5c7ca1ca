"""Benchmark of the segments algorithm (contours -> OWT -> UCM -> superpixels).

Quality on BSDS500 test (``../shared/data/BSDS500`` next to the repository, 30 images here):
contour map (NMS) ODS/OIS/AP, UCM ODS/OIS/AP and segmentation covering, with the BSDS protocol of
:mod:`clips4.evaluate.boundaries`.  Speed: single-threaded seconds per image of contours + UCM + labels.

    .venv/bin/python benchmarks/segments.py [--limit N] [--thresholds 99] [--workers 2] [--detector classical]

Targets: contour ODS F >= 0.62, UCM ODS F >= 0.60, <= 0.5 s per 321x481 image on one core.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterable  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from clips4.evaluate.boundaries import evaluate_boundaries  # noqa: E402
from clips4.pipeline.contours import build_detector  # noqa: E402
from clips4.pipeline.segments import cut_ucm, owt_ucm  # noqa: E402

BSDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "BSDS500"


# ---- reusable by the lead (Ray two-worker speed-up part) ---------------------------------------
def per_image_seconds(
    images: Iterable[np.ndarray],
    detector: str = "classical",
    *,
    ucm_threshold: float = 0.25,
    max_segments: int = 48,
    repeats: int = 1,
) -> list[dict]:
    """Time contours + OWT-UCM + labels for each (H, W, 3) uint8 RGB image, in this process.

    Sets OpenCV to one thread. Returns one dict per image: ``contours_s``, ``ucm_s``, ``labels_s``,
    ``total_s`` (best of ``repeats``), ``n_segments``, ``shape``.
    """
    cv2.setNumThreads(1)
    det = build_detector(detector)
    rows = []
    for img in images:
        best = None
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            cm = det(img)
            t1 = time.perf_counter()
            ucm = owt_ucm(cm)
            t2 = time.perf_counter()
            labels = cut_ucm(ucm, ucm_threshold, max_segments)
            t3 = time.perf_counter()
            row = {
                "contours_s": t1 - t0,
                "ucm_s": t2 - t1,
                "labels_s": t3 - t2,
                "total_s": t3 - t0,
                "n_segments": int(labels.max()) + 1,
                "shape": tuple(img.shape[:2]),
            }
            if best is None or row["total_s"] < best["total_s"]:
                best = row
        rows.append(best)
    return rows


# -------------------------------------------------------------------------------------------------


def _load_images(root: Path, split: str, limit: int | None) -> list[np.ndarray]:
    paths = sorted((root / "images" / split).glob("*.jpg"))
    if limit is not None:
        paths = paths[:limit]
    return [np.ascontiguousarray(cv2.imread(str(p))[:, :, ::-1]) for p in paths]


def ray_speedup(root: Path, split: str, n_images: int) -> float:
    """Throughput of the segments stage (the real stage: decode, compute, write Zarr parts) with 1 and 2 Ray
    workers on the same images, Ray started once beforehand so its start-up is not counted. Returns the ratio."""
    import tempfile

    import ray

    from clips4.pipeline.config import load_config
    from clips4.pipeline.runner import init_ray
    from clips4.pipeline.stage import run_stage

    init_ray("local")
    print(f"== Ray throughput: segments stage on {n_images} BSDS {split} images (1 CPU per worker)")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            cfg = load_config(None, None, [f"cache_root={tmp}/w{workers}", "dataset.kind=bsds", f"dataset.root={root}",
                                           f"dataset.split={split}", f"dataset.limit={n_images}", "ray.executor=ray",
                                           f"ray.num_workers={workers}", "ray.batch_size=4"], search=False)
            run = run_stage(cfg, "segments", show_progress=False)
            rates[workers] = run.processed / run.seconds
            print(f"  {workers} worker(s): {rates[workers]:.2f} img/s ({run.seconds:.1f} s for {run.processed} images)")
    ray.shutdown()
    ratio = rates[2] / rates[1]
    print(f"  speed-up 2 vs 1 workers: {ratio:.2f}x (target >= 1.6x on 2 cores)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=BSDS, help="BSDS500-layout folder")
    ap.add_argument("--split", default="test", help="split to score (default test)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--thresholds", type=int, default=99, help="number of thresholds (BSDS: 99)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the matching")
    ap.add_argument("--detector", default="classical", help="contour detector name")
    ap.add_argument("--out", type=Path, default=None, help="folder for boundaries.json and the PR plot")
    ap.add_argument("--skip-quality", action="store_true", help="only the speed parts")
    ap.add_argument("--ray-images", type=int, default=64, help="images for the Ray 1-vs-2-worker throughput part")
    ap.add_argument("--skip-ray", action="store_true", help="skip the Ray speed-up part")
    args = ap.parse_args()

    if not args.root.is_dir():
        raise SystemExit(f"BSDS500 not found at {args.root}")

    print(f"== speed: contours + OWT-UCM + labels, 1 thread ({args.detector})")
    images = _load_images(args.root, args.split, args.limit)
    rows = per_image_seconds(images, args.detector, repeats=2)
    tot = [r["total_s"] for r in rows]
    for key in ("contours_s", "ucm_s", "labels_s", "total_s"):
        vals = [r[key] for r in rows]
        print(f"  {key:11s} mean {statistics.mean(vals):.3f}  median {statistics.median(vals):.3f}  max {max(vals):.3f}")
    full = [r["total_s"] for r in rows if sorted(r["shape"]) == [321, 481]]
    if full:
        print(f"  321x481 images: {statistics.mean(full):.3f} s/image (target <= 0.5)")
    print(f"  segments per image (t=0.25, max 48): mean {statistics.mean(r['n_segments'] for r in rows):.1f}")
    if not args.skip_ray:
        ray_speedup(args.root, "train", args.ray_images)  # train has 200 images: enough to amortise actor start-up

    if args.skip_quality:
        return
    print(f"== quality: BSDS500 {args.split}, {args.thresholds} thresholds")
    t0 = time.perf_counter()
    res = evaluate_boundaries(
        args.root,
        split=args.split,
        thresholds=args.thresholds,
        detector=args.detector,
        limit=args.limit,
        workers=args.workers,
        out_dir=args.out,
    )
    c, u = res["contours"], res["ucm"]
    print(
        f"contours(NMS): ODS {c['ODS']['f']:.3f}  OIS {c['OIS']['f']:.3f}  AP {c['AP']:.3f}   (target ODS >= 0.62)\n"
        f"UCM:           ODS {u['ODS']['f']:.3f}  OIS {u['OIS']['f']:.3f}  AP {u['AP']:.3f}   (target ODS >= 0.60)\n"
        f"covering:      ODS {u['covering']['ODS']:.3f} (t={u['covering']['ODS_threshold']:.2f})  "
        f"OIS {u['covering']['OIS']:.3f}\n"
        f"speed:         {statistics.mean(tot):.3f} s/image (1 thread)   evaluation took {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
