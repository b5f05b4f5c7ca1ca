"""BSDS500 boundary benchmark for the contour maps and the UCMs of the segments stage.

Protocol (BSDS500 ``bench``): ``thresholds`` evenly spaced levels ``k / (N + 1)``, k = 1..N (99 by
default); at each level the binarised prediction is thinned and matched one-to-one to every human
boundary map with a maximum distance of 0.0075 x the image diagonal (``pyEdgeEval.correspond_pixels``,
the BSDS ``correspondPixels`` code); a predicted pixel is correct if it matches any annotator, recall
is accumulated over all annotators.  Reported: ODS (best fixed threshold over the dataset, with the BSDS
interpolation of the PR curve), OIS (best threshold per image) and AP.  Two predictions are scored:

* ``contours``: the contour strength after non-maximum suppression along the detector's orientation
  (``pyEdgeEval.nms``, Dollár's edge NMS, r=1, s=5, m=1.01);
* ``ucm``: the UCM pixel boundary map (:func:`clips4.pipeline.segments.ucm_to_boundary_map`).

For the UCM the segmentation covering of the human segmentations by the UCM regions at each threshold
is also reported (ODS, OIS and best, as in the BSDS region benchmark).

Two APs are reported, labelled: ``AP`` (pyEdgeEval's figure: the mean over recall levels 0, 0.01, ...,
0.99 of the best precision at that recall or more, divided by 101) and ``AP_bsds`` (the BSDS
``collect_eval_bdry`` figure: the PR curve linearly interpolated at recall 0, 0.01, ..., 1 within the
recall range the curve covers, summed and divided by 100, i.e. the area under the interpolated curve).

What is scored is what the segments stage wrote: ``predictions`` maps an image id to its arrays
(:func:`segments_predictions` reads them from the stage's output; ``clips4 evaluate boundaries`` runs the stage, or
reuses its cache, first). This module computes no contours of its own.

Scaling: the per-image matching runs on the stages' executor (``executor='ray'``: one Ray task per image,
one CPU each, so a Ray cluster speeds it up), or a local process pool.  With ``out_dir`` the per-image
counts are cached in ``out_dir/counts/<image_id>-<key>.npz``, the key hashing the prediction arrays, the ground
truth's content, the thresholds, the tolerance and the scored maps: a rerun scores only the images whose counts are
missing, also after the dataset was copied again (file contents, not modification times, name an image).

Matcher randomness: pyEdgeEval's ``correspond_pixels`` (the BSDS CSA matcher) draws from a C++ generator
seeded from the clock when the library loads, and exposes no seed, so it cannot be pinned from Python.
Its size: on identical inputs two processes gave 5975 vs 5967 matched pixels (0.13 %); the cached counts
make a rerun reproduce the first run's figures exactly.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from clips4.pipeline.datasets import BSDSDataset, load_bsds_ground_truth

__all__ = [
    "threshold_levels",
    "boundary_counts",
    "covering_counts",
    "evaluate_image",
    "summarize_boundaries",
    "summarize_covering",
    "evaluate_boundaries",
    "segments_predictions",
    "MAX_DIST",
]

MAX_DIST = 0.0075


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _list_images(root: Path, split: str) -> list[tuple[str, Path, Path]]:
    """(id, image, groundTruth .mat) of every annotated image of a BSDS split (the dataset reader's layout)."""
    recs = [r for r in BSDSDataset(str(root), split).records() if r.gt_path]
    if not recs:
        raise FileNotFoundError(f"no image/groundTruth pairs under {root} for split {split!r}")
    return [(r.image_id, Path(r.path), Path(r.gt_path)) for r in recs]


def threshold_levels(n: int) -> np.ndarray:
    """The BSDS thresholds: ``linspace(1/(n+1), 1 - 1/(n+1), n)``."""
    if n < 1:
        raise ValueError("thresholds must be >= 1")
    return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)


# ------------------------------------------------------------------------------------------------
# per image
# ------------------------------------------------------------------------------------------------


def boundary_counts(
    pred: np.ndarray,
    gts: list[np.ndarray],
    thresholds: np.ndarray,
    *,
    max_dist: float = MAX_DIST,
    thin: bool = True,
) -> np.ndarray:
    """(4, T) array ``(count_r, sum_r, count_p, sum_p)`` at each threshold (``pred >= t`` is boundary).

    Identical binary maps at successive thresholds (e.g. a quantised UCM) are matched only once.
    """
    from pyEdgeEval import correspond_pixels
    from pyEdgeEval.preprocess import binary_thin

    pred = np.asarray(pred, dtype=np.float64)
    out = np.zeros((4, len(thresholds)), dtype=np.float64)
    gts_f = [np.asarray(g, dtype=bool) for g in gts]
    gt_total = float(sum(g.sum() for g in gts_f))
    prev_key = None
    prev = None
    for i, t in enumerate(thresholds):
        bmap = pred >= t
        key = int(bmap.sum())
        if prev is not None and key == prev_key and np.array_equal(bmap, prev[0]):
            out[:, i] = prev[1]
            continue
        b = binary_thin(bmap) if thin else bmap
        acc = np.zeros(b.shape, dtype=bool)
        count_r = 0.0
        if b.any():
            bf = b.astype(np.float64)
            for g in gts_f:
                if not g.any():
                    continue
                m1, m2, _, _ = correspond_pixels(bf, g.astype(np.float64), max_dist=max_dist)
                acc |= m1 > 0
                count_r += float((m2 > 0).sum())
        col = (count_r, gt_total, float(acc.sum()), float(b.sum()))
        out[:, i] = col
        prev_key, prev = key, (bmap, col)
    return out


def covering_counts(ucm: Any, segs: list[np.ndarray], thresholds: np.ndarray) -> np.ndarray:
    """(2, T) array ``(cnt_r, sum_r)``: covering of the human segmentations by the UCM regions.

    At threshold t the regions are ``cut_ucm(ucm, t, max_segments=None)``; for every annotator and
    every human region R, ``|R| * max_S IoU(R, S)`` is added to cnt_r and the pixel count to sum_r
    (BSDS ``evaluation_reg_image``), so covering = cnt_r / sum_r.
    """
    from clips4.pipeline.segments import cut_ucm

    out = np.zeros((2, len(thresholds)), dtype=np.float64)
    segs_c = []
    for s in segs:
        _, inv = np.unique(s.ravel(), return_inverse=True)
        gt = inv.astype(np.int64)
        segs_c.append((gt, np.bincount(gt).astype(np.float64)))
    cache: dict[int, tuple[float, float]] = {}
    for i, t in enumerate(thresholds):
        labels = cut_ucm(ucm, float(t), max_segments=None).ravel().astype(np.int64)
        n = int(labels.max()) + 1
        if n in cache:  # region count determines the (nested) cut uniquely
            out[:, i] = cache[n]
            continue
        area_s = np.bincount(labels, minlength=n).astype(np.float64)
        cnt = 0.0
        tot = 0.0
        for gt, area_g in segs_c:
            ng = area_g.size
            conf = np.bincount(labels * ng + gt, minlength=n * ng).reshape(n, ng).astype(np.float64)
            iou = conf / (area_s[:, None] + area_g[None, :] - conf)
            cnt += float((area_g * iou.max(axis=0)).sum())
            tot += float(gt.size)
        cache[n] = (cnt, tot)
        out[:, i] = (cnt, tot)
    return out


def _nms(strength: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    from pyEdgeEval import nms

    return np.asarray(nms(strength.astype(np.float64), orientation.astype(np.float64), r=1, s=5, m=1.01))


def _decode_prediction(pred: dict) -> dict:
    """Quantised cache arrays (uint8) or float arrays -> float maps."""
    from clips4.pipeline.segments import decode_orientation

    out = dict(pred)
    c = np.asarray(pred["contours"])
    out["contours"] = c.astype(np.float32) / 255.0 if c.dtype == np.uint8 else c.astype(np.float32)
    if pred.get("orientation") is not None:
        out["orientation"] = decode_orientation(pred["orientation"])
    else:  # no stored orientation: estimate it from the edge map itself
        from clips4.pipeline.contours import orientation_from_edges

        out["orientation"] = orientation_from_edges(out["contours"])
    return out


def evaluate_image(
    pred: dict,
    gt_path: str | Path,
    thresholds: np.ndarray,
    *,
    max_dist: float = MAX_DIST,
    which: tuple[str, ...] = ("contours", "ucm"),
) -> dict[str, np.ndarray]:
    """Counts for one image. ``pred``: ``contours`` (H, W) (uint8 or float [0, 1]), ``orientation``
    (uint8 degrees or float radians), ``ucm`` (H, W, 2) UCM array.  Returns ``contours`` / ``ucm``
    (4, T) boundary counts and ``covering`` (2, T)."""
    from clips4.pipeline.segments import ucm_to_boundary_map

    bounds, segs = load_bsds_ground_truth(gt_path)
    p = _decode_prediction(pred)
    res: dict[str, np.ndarray] = {}
    if "contours" in which:
        res["contours"] = boundary_counts(_nms(p["contours"], p["orientation"]), bounds, thresholds, max_dist=max_dist)
    if "ucm" in which:
        res["ucm"] = boundary_counts(ucm_to_boundary_map(p["ucm"]), bounds, thresholds, max_dist=max_dist)
        res["covering"] = covering_counts(p["ucm"], segs, thresholds)
    return res


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------


def _prf(count_r, sum_r, count_p, sum_p):
    from pyEdgeEval.common.metrics import compute_rec_prec_f1

    return compute_rec_prec_f1(count_r, sum_r, count_p, sum_p)


def summarize_boundaries(counts: list[np.ndarray], thresholds: np.ndarray) -> dict:
    """ODS / OIS / AP and the PR curve from per-image (4, T) counts (BSDS ``collect_eval_bdry``)."""
    from pyEdgeEval.common.metrics import interpolated_max_scores

    total = np.sum(counts, axis=0)
    rec, prec, f = _prf(*total)
    t_ods, r_ods, p_ods, f_ods = interpolated_max_scores(thresholds, rec, prec)
    best = np.zeros(4)
    for c in counts:
        _, _, fi = _prf(*c)
        best += c[:, int(np.argmax(fi))]
    r_ois, p_ois, f_ois = _prf(*[float(x) for x in best])
    # AP as in the BSDS/pyEdgeEval benchmark: mean interpolated precision at recall 0, 0.01, ..., 0.99
    ap = 0.0
    for r0 in np.arange(0, 1, 0.01):
        ap += float(np.max(prec[rec >= r0], initial=0.0)) / 101.0
    return {
        "ODS": {"f": float(f_ods), "precision": float(p_ods), "recall": float(r_ods), "threshold": float(t_ods)},
        "OIS": {"f": float(f_ois), "precision": float(p_ois), "recall": float(r_ois)},
        "AP": float(ap),
        "AP_bsds": bsds_average_precision(rec, prec),
        "curve": {
            "threshold": [float(x) for x in thresholds],
            "recall": [float(x) for x in rec],
            "precision": [float(x) for x in prec],
            "f": [float(x) for x in f],
        },
    }


def bsds_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """AP as the BSDS benchmark (``collect_eval_bdry.m``) defines it: area under the interpolated PR curve.

    The (recall, precision) points of the thresholds are made unique in recall, the curve is linearly
    interpolated at recall 0, 0.01, ..., 1 (only inside the recall range it covers: outside, MATLAB's
    ``interp1`` gives NaN, which the sum skips), and the values are summed and divided by 100.
    """
    r = np.asarray(recall, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    # MATLAB unique() keeps the last occurrence of each recall (the highest threshold, i.e. the best precision
    # for the thresholds sweeping from low to high), then sorts by recall
    _, idx = np.unique(r[::-1], return_index=True)
    idx = len(r) - 1 - idx
    order = np.argsort(r[idx])
    r, p = r[idx][order], p[idx][order]
    if len(r) < 2:
        return 0.0
    grid = np.linspace(0.0, 1.0, 101)
    inside = (grid >= r[0]) & (grid <= r[-1])
    return float(np.interp(grid[inside], r, p).sum() / 100.0)


def summarize_covering(counts: list[np.ndarray], thresholds: np.ndarray) -> dict:
    """Segmentation covering ODS / OIS / best (BSDS ``collect_eval_reg``) from per-image (2, T) counts."""
    total = np.sum(counts, axis=0)
    cov = total[0] / np.maximum(total[1], 1e-12)
    i = int(np.argmax(cov))
    ois_cnt = ois_sum = 0.0
    for c in counts:
        j = int(np.argmax(c[0] / np.maximum(c[1], 1e-12)))
        ois_cnt += c[0, j]
        ois_sum += c[1, j]
    return {
        "ODS": float(cov[i]),
        "ODS_threshold": float(thresholds[i]),
        "OIS": float(ois_cnt / max(ois_sum, 1e-12)),
        "curve": [float(x) for x in cov],
    }


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------

def segments_predictions(stage_url: str) -> tuple[Callable[[str], dict], list[str]]:
    """``(predictions, image ids)`` of a finished segments stage output (``run_stage(cfg, "segments").url``):
    ``predictions(image_id)`` reads the maps that are scored: the image's ``contours``, ``orientation`` and ``ucm``
    (so its counts' cache key is those arrays' bytes)."""
    from clips4.pipeline.cache import StageReader

    reader = StageReader(stage_url)

    def predictions(image_id: str) -> dict:
        return {k: reader.get(image_id, k) for k in ("contours", "orientation", "ucm")}

    return predictions, list(reader.image_ids)


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)


def _task(args: tuple) -> tuple[str, dict, float]:
    image_id, gt_path, pred, thresholds, which = args
    t0 = time.perf_counter()
    res = evaluate_image(pred, gt_path, thresholds, which=which)
    res["n_segments"] = int(np.asarray(pred["labels"]).max()) + 1 if pred.get("labels") is not None else -1
    return image_id, res, time.perf_counter() - t0


_RAY_READY = False


def _ray_task(args: tuple) -> tuple[str, dict, float]:
    """Body of one Ray task: the worker process is set to one thread once, then scores images."""
    global _RAY_READY
    if not _RAY_READY:
        _worker_init()
        _RAY_READY = True
    return _task(args)


def _count_key(image_id: str, pred: dict, levels: np.ndarray, which: tuple[str, ...],
               gt_path: Optional[Path] = None) -> str:
    """Cache key of one image's counts: what was scored (the prediction's bytes) against which human boundaries
    (the ground-truth file's content), and how. Contents, not size and mtime: a dataset copied again (rsync
    without -t, a fresh checkout, an object-store sync) keeps its counts."""
    from clips4.pipeline.io import file_sha256

    h = hashlib.sha256()
    h.update(json.dumps({"id": image_id, "levels": [round(float(x), 9) for x in levels], "max_dist": MAX_DIST,
                         "which": list(which), "v": 2}, sort_keys=True).encode())
    if gt_path is not None:
        h.update(f"gt:{file_sha256(gt_path)}".encode())
    for k in ("contours", "orientation", "ucm", "labels"):
        if pred.get(k) is not None:
            a = np.ascontiguousarray(pred[k])
            h.update(f"{k}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:20]


def _save_counts(path: Path, res: dict, sec: float) -> None:
    arrays = {k: np.asarray(v) for k, v in res.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in res.items() if not isinstance(v, np.ndarray)}
    meta["seconds"] = sec
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    os.replace(tmp, path)


def _load_counts(path: Path) -> tuple[dict, float] | None:
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            res = {k: z[k] for k in z.files if k != "meta"}
    except Exception:  # noqa: BLE001 - a damaged cache file is rescored
        return None
    sec = float(meta.pop("seconds", 0.0))
    res.update(meta)
    return res, sec


def evaluate_boundaries(
    root: str | Path,
    predictions: Optional[Callable[[str], dict]] = None,
    *,
    split: str = "test",
    thresholds: int = 99,
    detector: str = "segments stage",
    limit: Optional[int] = None,
    workers: int = 2,
    out_dir: str | Path | None = None,
    which: tuple[str, ...] = ("contours", "ucm"),
    image_ids: Optional[Iterable[str]] = None,
    quiet: bool = False,
    executor: str = "process",
    ray_address: str = "local",
    cache_counts: bool = True,
) -> dict:
    """Score the segments stage's contour maps (NMS) and UCMs on a BSDS500-layout folder.

    Args:
        root: folder with ``images/<split>/*.jpg`` and ``groundTruth/<split>/*.mat``.
        predictions: ``image_id -> dict(contours=..., orientation=..., ucm=...)`` (``labels`` optional: the
            per-image segment count): the segments stage's arrays (:func:`segments_predictions`; uint8 quantised or
            float); called in this process. Required: without it a :class:`ValueError` names the stage to run.
        split: 'test', 'val' or 'train'.
        thresholds: number of evenly spaced thresholds (BSDS: 99).
        detector: what made the predictions, for the report (e.g. the stage's ``segments.detector``).
        limit: only the first ``limit`` images (sorted by id).
        workers: parallel workers (Ray tasks in flight, or spawned processes); <= 1 runs inline.
        out_dir: if given, writes ``boundaries.json``, ``boundaries_pr.png`` and the per-image count cache
            ``counts/`` there.
        which: subset of ('contours', 'ucm') to score.
        image_ids: restrict to these ids.
        quiet: no table printing.
        executor: 'ray' (one Ray task per image, one CPU each; the stages' executor), 'process' (a local
            spawn pool) or 'local' (this process).
        ray_address: where Ray runs ('local' starts a private instance; 'auto' / 'ray://...' joins a cluster).
        cache_counts: with ``out_dir``, reuse and write the per-image counts.

    Returns:
        dict with ``contours`` and ``ucm`` summaries (ODS/OIS/AP/AP_bsds/curve; ``ucm`` also ``covering``),
        ``per_image`` rows and run info (``n_scored``: images matched in this run, ``n_cached``: reused).
    """
    root = Path(root)
    if predictions is None:
        raise ValueError(
            f"evaluate_boundaries scores the segments stage's output and computes none itself: pass predictions "
            f"(segments_predictions(run_stage(cfg, 'segments').url)), after `clips4 precompute segments --dataset "
            f"bsds --root {root} --split {split}` (`clips4 evaluate boundaries` runs it, or reuses its cache, first)")
    items = _list_images(root, split)
    if image_ids is not None:
        wanted = set(image_ids)
        items = [it for it in items if it[0] in wanted]
    if limit is not None:
        items = items[: int(limit)]
    if executor not in ("ray", "process", "local"):
        raise ValueError(f"executor must be 'ray', 'process' or 'local', got {executor!r}")
    levels = threshold_levels(int(thresholds))
    t0 = time.perf_counter()
    counts_dir = Path(out_dir) / "counts" if (out_dir is not None and cache_counts) else None
    if counts_dir is not None:
        counts_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    todo: list[tuple] = []
    cache_paths: dict[str, Path] = {}
    for image_id, _img, gt in items:
        pred = predictions(image_id)
        if counts_dir is not None:
            cp = counts_dir / f"{image_id}-{_count_key(image_id, pred, levels, tuple(which), gt)}.npz"
            cache_paths[image_id] = cp
            got = _load_counts(cp) if cp.is_file() else None
            if got is not None:
                results[image_id], seconds[image_id] = got
                continue
        todo.append((image_id, gt, pred, levels, tuple(which)))
    n_cached = len(results)

    def done(image_id: str, res: dict, sec: float) -> None:
        results[image_id] = res
        seconds[image_id] = sec
        if image_id in cache_paths:
            _save_counts(cache_paths[image_id], res, sec)
        if not quiet:
            print(f"  [{len(results)}/{len(items)}] {image_id}: {sec:.1f} s", flush=True)

    t_match = time.perf_counter()
    if executor == "local" or workers <= 1 or len(todo) <= 1:
        for args in todo:
            done(*_task(args))
    elif executor == "ray":
        import ray

        from clips4.pipeline.runner import init_ray

        init_ray(ray_address)
        remote = ray.remote(num_cpus=1)(_ray_task)
        queue = list(todo)
        pending: list = []
        # at most `workers` tasks in flight: the worker count is the knob, as for the stages
        while queue or pending:
            while queue and len(pending) < int(workers):
                pending.append(remote.remote(queue.pop(0)))
            ready, pending = ray.wait(pending, num_returns=1)
            done(*ray.get(ready[0]))
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(processes=int(workers), initializer=_worker_init) as pool:
            for image_id, res, sec in pool.imap_unordered(_task, todo):
                done(image_id, res, sec)
    match_seconds = time.perf_counter() - t_match
    ids = [it[0] for it in items]
    summary: dict[str, Any] = {
        "root": str(root),
        "split": split,
        "detector": detector,
        "thresholds": int(thresholds),
        "max_dist": MAX_DIST,
        "n_images": len(ids),
        "n_scored": len(todo),
        "n_cached": n_cached,
        "executor": executor,
        "workers": int(workers),
        "match_seconds": match_seconds,
        "seconds": time.perf_counter() - t0,
    }
    if "contours" in which:
        summary["contours"] = summarize_boundaries([results[i]["contours"] for i in ids], levels)
    if "ucm" in which:
        summary["ucm"] = summarize_boundaries([results[i]["ucm"] for i in ids], levels)
        summary["ucm"]["covering"] = summarize_covering([results[i]["covering"] for i in ids], levels)
    per_image = []
    for i in ids:
        row: dict[str, Any] = {"image_id": i, "seconds": seconds[i], "n_segments": int(results[i].get("n_segments", -1))}
        for k in ("contours", "ucm"):
            if k in results[i]:
                _, _, f = _prf(*results[i][k])
                row[f"{k}_best_f"] = float(np.max(f))
        per_image.append(row)
    summary["per_image"] = per_image
    if not quiet:
        print_summary(summary)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "boundaries.json").write_text(json.dumps(summary, indent=2))
        plot_pr(summary, out / "boundaries_pr.png")
    return summary


def print_summary(summary: dict) -> None:
    """Rich table of ODS / OIS / AP (and covering)."""
    from rich.table import Table

    from clips4.pipeline.console import make_console

    table = Table(
        title=f"BSDS boundaries: {summary['split']} ({summary['n_images']} images, "
        f"{summary['thresholds']} thresholds, detector={summary['detector']})"
    )
    for col in ("map", "ODS F", "ODS P", "ODS R", "ODS t", "OIS F", "AP (pyEdgeEval)", "AP (BSDS)", "covering ODS",
                "covering OIS"):
        table.add_column(col, justify="right" if col != "map" else "left")
    for key in ("contours", "ucm"):
        if key not in summary:
            continue
        s = summary[key]
        cov = s.get("covering")
        table.add_row(
            "contours (NMS)" if key == "contours" else "UCM",
            f"{s['ODS']['f']:.3f}",
            f"{s['ODS']['precision']:.3f}",
            f"{s['ODS']['recall']:.3f}",
            f"{s['ODS']['threshold']:.2f}",
            f"{s['OIS']['f']:.3f}",
            f"{s['AP']:.3f}",
            f"{s['AP_bsds']:.3f}" if "AP_bsds" in s else "-",
            f"{cov['ODS']:.3f}" if cov else "-",
            f"{cov['OIS']:.3f}" if cov else "-",
        )
    make_console().print(table)


def plot_pr(summary: dict, path: str | Path) -> None:
    """PR curves of the scored maps with iso-F lines and the ODS points (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    r = np.linspace(0.01, 1, 200)
    for fv in np.arange(0.1, 1.0, 0.1):
        with np.errstate(divide="ignore", invalid="ignore"):
            p = fv * r / (2 * r - fv)
        ok = (p > 0) & (p <= 1)
        ax.plot(r[ok], p[ok], color="0.85", lw=0.8, zorder=0)
        if ok.any():
            ax.text(r[ok][-1], min(p[ok][-1], 0.98), f"F={fv:.1f}", fontsize=6, color="0.6")
    for key, color, name in (("contours", "tab:blue", "contours (NMS)"), ("ucm", "tab:red", "UCM")):
        if key not in summary:
            continue
        s = summary[key]
        c = s["curve"]
        rec = np.asarray(c["recall"])
        prec = np.asarray(c["precision"])
        ok = (rec > 0) | (prec > 0)
        ax.plot(rec[ok], prec[ok], color=color, lw=1.8, label=f"{name}: ODS {s['ODS']['f']:.3f}, AP {s['AP']:.3f}")
        ax.plot([s["ODS"]["recall"]], [s["ODS"]["precision"]], "o", color=color)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_title(f"BSDS500 {summary['split']} ({summary['n_images']} images)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(False)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
