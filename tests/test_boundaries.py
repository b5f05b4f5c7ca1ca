import json
from pathlib import Path

import numpy as np
import pytest

from clips4.evaluate.boundaries import (
    boundary_counts,
    covering_counts,
    evaluate_boundaries,
    summarize_boundaries,
    summarize_covering,
    threshold_levels,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BSDS = DATA / "BSDS500"


def _square_gt(h=150, w=200):
    y0, y1, x0, x1 = h // 4, 3 * h // 4, w // 4, 3 * w // 4
    seg = np.ones((h, w), np.int64)
    seg[y0:y1, x0:x1] = 2
    b = np.zeros((h, w), bool)
    b[y0:y1, x0] = b[y0:y1, x1 - 1] = True
    b[y0, x0:x1] = b[y1 - 1, x0:x1] = True
    return b, seg


def test_threshold_levels():
    t = threshold_levels(99)
    assert len(t) == 99 and abs(t[0] - 0.01) < 1e-12 and abs(t[-1] - 0.99) < 1e-12


def test_identical_prediction_f_one():
    b, _ = _square_gt()
    levels = threshold_levels(5)
    c = boundary_counts(b.astype(np.float32), [b, b], levels)
    s = summarize_boundaries([c], levels)
    # (thinning trims the square's corner pixels, so F is just below 1)
    assert s["ODS"]["f"] > 0.97 and s["OIS"]["f"] > 0.97
    assert s["AP"] > 0.9


def test_shifted_prediction_within_tolerance():
    b, _ = _square_gt(200, 300)  # tolerance 0.0075 * diagonal = 2.7 px
    shifted = np.roll(b, 2, axis=1)
    levels = threshold_levels(3)
    s = summarize_boundaries([boundary_counts(shifted.astype(np.float32), [b], levels)], levels)
    assert s["ODS"]["f"] > 0.95


def test_empty_prediction_recall_zero():
    b, _ = _square_gt()
    levels = threshold_levels(5)
    c = boundary_counts(np.zeros(b.shape, np.float32), [b], levels)
    assert np.all(c[0] == 0) and np.all(c[1] == b.sum())
    s = summarize_boundaries([c], levels)
    assert s["ODS"]["recall"] == 0 and s["ODS"]["f"] == 0 and s["AP"] == 0


def test_covering_perfect_and_trivial():
    from clips4.pipeline.segments import edge_mask

    _, seg = _square_gt()
    H, W = seg.shape
    u = np.zeros((H, W, 2), np.uint8)
    u[:, :-1, 0] = np.where(seg[:, :-1] != seg[:, 1:], 200, 0)
    u[:-1, :, 1] = np.where(seg[:-1] != seg[1:], 200, 0)
    u[~edge_mask(H, W)] = 0
    levels = threshold_levels(5)
    c = covering_counts(u, [seg], levels)
    cov = summarize_covering([c], levels)
    assert cov["ODS"] > 0.999 and cov["OIS"] > 0.999
    # above 200/255 everything merges: covering = area-weighted IoU of a single region
    assert c[0, -1] / c[1, -1] < 0.9


def test_predictions_callable_and_outputs(tmp_path):
    """Fake 1-image BSDS folder, predictions from a callable (the cache path)."""
    import scipy.io as sio
    import cv2

    b, seg = _square_gt()
    root = tmp_path / "bsds"
    (root / "images" / "test").mkdir(parents=True)
    (root / "groundTruth" / "test").mkdir(parents=True)
    img = np.where(seg[..., None] == 2, np.uint8(200), np.uint8(40)).repeat(3, axis=2)
    cv2.imwrite(str(root / "images" / "test" / "1.jpg"), img)
    gt = np.empty((1, 2), dtype=object)
    for k in range(2):
        gt[0, k] = {"Segmentation": seg.astype(np.uint16), "Boundaries": b.astype(np.uint8)}
    sio.savemat(str(root / "groundTruth" / "test" / "1.mat"), {"groundTruth": gt})

    from clips4.pipeline.contours import build_detector
    from clips4.pipeline.segments import compute_segments

    arrays = compute_segments(img[:, :, ::-1].copy(), build_detector("classical"))
    calls = []

    def predictions(image_id):
        calls.append(image_id)
        return arrays

    res = evaluate_boundaries(root, thresholds=5, predictions=predictions, workers=1, out_dir=tmp_path / "out")
    assert calls == ["1"]
    assert res["contours"]["ODS"]["f"] > 0.85
    assert res["ucm"]["ODS"]["f"] > 0.85
    assert res["ucm"]["covering"]["ODS"] > 0.9
    saved = json.loads((tmp_path / "out" / "boundaries.json").read_text())
    assert saved["n_images"] == 1 and "curve" in saved["ucm"]
    assert (tmp_path / "out" / "boundaries_pr.png").stat().st_size > 1000


def test_without_the_stages_predictions_the_error_names_the_stage_to_run(tmp_path):
    """The evaluation scores what the segments stage wrote and computes no contours of its own."""
    root = _fake_bsds(tmp_path / "bsds", n=1)
    with pytest.raises(ValueError, match=r"clips4 precompute segments --dataset bsds --root .*bsds --split test"):
        evaluate_boundaries(root, thresholds=5, workers=1, quiet=True)


@pytest.mark.slow
def test_real_bsds_image(tmp_path):
    if not (BSDS / "groundTruth" / "test").is_dir():
        pytest.skip(f"BSDS500 not available at {BSDS}")
    from clips4.evaluate.boundaries import segments_predictions
    from clips4.pipeline.config import load_config
    from clips4.pipeline.stage import run_stage

    cfg = load_config(None, None, [f"cache_root={tmp_path / 'cache'}", "dataset.kind=bsds", f"dataset.root={BSDS}",
                                   "dataset.split=test", "dataset.limit=1", "ray.executor=local",
                                   "segments.detector=classical"], search=False)
    predictions, ids = segments_predictions(run_stage(cfg, "segments", show_progress=False).url)
    res = evaluate_boundaries(BSDS, predictions, thresholds=5, image_ids=ids, workers=1, quiet=True)
    assert res["n_images"] == 1 and res["detector"] == "segments stage"
    for key in ("contours", "ucm"):
        assert 0.3 < res[key]["ODS"]["f"] <= 1.0
        assert 0.0 < res[key]["AP"] <= 1.0
    assert 0.2 < res["ucm"]["covering"]["ODS"] <= 1.0


def _fake_bsds(root, n=2):
    import cv2
    import scipy.io as sio

    b, seg = _square_gt()
    (root / "images" / "test").mkdir(parents=True)
    (root / "groundTruth" / "test").mkdir(parents=True)
    for i in range(n):
        img = np.where(seg[..., None] == 2, np.uint8(200 - 30 * i), np.uint8(40)).repeat(3, axis=2)
        cv2.imwrite(str(root / "images" / "test" / f"{i}.jpg"), img)
        gt = np.empty((1, 1), dtype=object)
        gt[0, 0] = {"Segmentation": seg.astype(np.uint16), "Boundaries": b.astype(np.uint8)}
        sio.savemat(str(root / "groundTruth" / "test" / f"{i}.mat"), {"groundTruth": gt})
    return root


def _predictions(root, split="test"):
    """What the segments stage computes for each image (the classical detector), by image id."""
    import cv2

    from clips4.pipeline.contours import build_detector
    from clips4.pipeline.segments import compute_segments

    det = build_detector("classical")
    preds = {p.stem: compute_segments(np.ascontiguousarray(cv2.imread(str(p))[:, :, ::-1]), det)
             for p in sorted((Path(root) / "images" / split).glob("*.jpg"))}
    return preds.__getitem__


def test_counts_cached_rerun_scores_only_missing(tmp_path):
    root = _fake_bsds(tmp_path / "bsds", n=2)
    preds = _predictions(root)
    out = tmp_path / "out"
    first = evaluate_boundaries(root, preds, thresholds=5, workers=1, out_dir=out, quiet=True, which=("contours",))
    assert (first["n_scored"], first["n_cached"]) == (2, 0)
    again = evaluate_boundaries(root, preds, thresholds=5, workers=1, out_dir=out, quiet=True, which=("contours",))
    assert (again["n_scored"], again["n_cached"]) == (0, 2)
    assert again["contours"]["ODS"] == first["contours"]["ODS"]
    # one image's counts gone: only that image is matched again
    next(iter((out / "counts").glob("1-*.npz"))).unlink()
    third = evaluate_boundaries(root, preds, thresholds=5, workers=1, out_dir=out, quiet=True, which=("contours",))
    assert (third["n_scored"], third["n_cached"]) == (1, 1)
    # other settings (thresholds) are other counts, not a stale reuse
    other = evaluate_boundaries(root, preds, thresholds=7, workers=1, out_dir=out, quiet=True, which=("contours",))
    assert other["n_scored"] == 2
    # the dataset copied again (new modification times, same bytes): every count is still found
    import os
    import shutil

    copy = shutil.copytree(root, tmp_path / "bsds-copy", copy_function=shutil.copyfile)
    for f in Path(copy).rglob("*.*"):
        os.utime(f, (1_000_000_000, 1_000_000_000))
    moved = evaluate_boundaries(copy, preds, thresholds=5, workers=1, out_dir=out, quiet=True, which=("contours",))
    assert (moved["n_scored"], moved["n_cached"]) == (0, 2)
    # ... but a ground truth whose content changed is scored again
    gt0 = Path(copy) / "groundTruth" / "test" / "0.mat"
    import scipy.io as sio

    m = sio.loadmat(str(gt0))
    m["groundTruth"][0, 0]["Boundaries"][0, 0][:] = 0
    sio.savemat(str(gt0), {"groundTruth": m["groundTruth"]})
    changed = evaluate_boundaries(copy, preds, thresholds=5, workers=1, out_dir=out, quiet=True, which=("contours",))
    assert (changed["n_scored"], changed["n_cached"]) == (1, 1)


def test_bsds_ap_is_area_under_interpolated_curve():
    from clips4.evaluate.boundaries import bsds_average_precision

    # a straight PR line from (r=0, p=1) to (r=1, p=0): area 0.5 (101 grid points / 100 = 0.505 by the BSDS sum)
    r = np.linspace(1, 0, 11)
    assert bsds_average_precision(r, 1 - r) == pytest.approx(0.505, abs=1e-9)
    # constant precision 0.8 over recall 0.2..0.6: only the covered recall range counts (41 points)
    r = np.linspace(0.6, 0.2, 5)
    assert bsds_average_precision(r, np.full(5, 0.8)) == pytest.approx(0.8 * 41 / 100, abs=1e-9)


@pytest.mark.ray
def test_ray_executor_matches_inline(tmp_path):
    ray = pytest.importorskip("ray")
    root = _fake_bsds(tmp_path / "bsds", n=2)
    preds = _predictions(root)
    inline = evaluate_boundaries(root, preds, thresholds=5, workers=1, quiet=True, which=("contours",))
    try:
        dist = evaluate_boundaries(root, preds, thresholds=5, workers=2, quiet=True, which=("contours",),
                                   executor="ray")
    finally:  # the private instance would otherwise idle beside the rest of this test process's tests
        ray.shutdown()
    assert dist["n_scored"] == 2 and dist["executor"] == "ray"
    assert abs(dist["contours"]["ODS"]["f"] - inline["contours"]["ODS"]["f"]) < 0.02
