import math

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from clips4.pipeline.contours import ContourMap, build_detector
from clips4.pipeline.segments import hg  # higra as the stage imports it (without its plotting helpers)
from clips4.pipeline.segments import (
    Ucm,
    compute_segments,
    cut_ucm,
    decode_orientation,
    edge_mask,
    encode_orientation,
    num_regions,
    owt_ucm,
    ucm_to_boundary_map,
)


def _textured_image(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 3] = (200, 40, 40)
    img[:, w // 3 : 2 * w // 3] = (40, 180, 60)
    img[:, 2 * w // 3 :] = (30, 40, 200)
    yy, xx = np.mgrid[0:h, 0:w]
    img[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 < 100] = (240, 240, 240)
    noise = rng.integers(-25, 25, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _reference_components(w: np.ndarray, level: int) -> np.ndarray:
    """Connected components of the 4-adjacency graph restricted to edges with w <= level (scipy)."""
    H, W = w.shape[:2]
    g = hg.get_4_adjacency_graph((H, W))
    src, dst = g.edge_list()
    keep = w[edge_mask(H, W)] <= level
    m = coo_matrix((np.ones(keep.sum()), (src[keep], dst[keep])), shape=(H * W, H * W))
    _, lab = connected_components(m, directed=False)
    return lab.reshape(H, W)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.fixture(scope="module")
def seg():
    return compute_segments(_textured_image(), build_detector("classical"), ucm_threshold=0.25, max_segments=48)


def test_compute_segments_arrays(seg):
    assert set(seg) >= {"contours", "orientation", "ucm", "labels"}
    H, W = 48, 64
    assert seg["contours"].shape == (H, W) and seg["contours"].dtype == np.uint8
    assert seg["orientation"].shape == (H, W) and seg["orientation"].dtype == np.uint8
    assert seg["orientation"].max() < 180
    assert seg["ucm"].shape == (H, W, 2) and seg["ucm"].dtype == np.uint8
    assert seg["labels"].shape == (H, W) and seg["labels"].dtype == np.int32
    # padding of the layout is zero
    assert not seg["ucm"][:, -1, 0].any() and not seg["ucm"][-1, :, 1].any()


def test_labels_contiguous(seg):
    lab = seg["labels"]
    n = lab.max() + 1
    assert lab.min() == 0
    assert np.array_equal(np.unique(lab), np.arange(n))


def test_ucm_is_ultrametric_and_recut_exact(seg):
    w = seg["ucm"]
    levels = np.unique(w)
    assert len(levels) > 2
    for t in (0.0, 0.05, 0.1, 0.25, 0.4, 0.6, 1.0):
        lab = cut_ucm(w, t, max_segments=None)
        ref = _reference_components(w, math.floor(t * 255 + 1e-6))
        assert _same_partition(lab, ref), t
        assert np.array_equal(np.unique(lab), np.arange(lab.max() + 1))
    # ultrametric: no edge inside a region at level k has a value > k, and every edge between two
    # regions at level k has a value > k
    for k in levels[1:-1][:: max(1, len(levels) // 6)]:
        lab = cut_ucm(w, k / 255.0, max_segments=None)
        r = w[:, :-1, 0]
        d = w[:-1, :, 1]
        same_r = lab[:, :-1] == lab[:, 1:]
        same_d = lab[:-1] == lab[1:]
        assert np.all(r[~same_r] > k) and np.all(d[~same_d] > k)
    # same cut from the Ucm object and from a float saliency array
    assert np.array_equal(cut_ucm(Ucm(w), 0.3, None), cut_ucm(w, 0.3, None))
    assert np.array_equal(cut_ucm(w.astype(np.float32) / 255, 0.3, None), cut_ucm(w, 0.3, None))


def test_max_segments_respected(seg):
    w = seg["ucm"]
    n_free = cut_ucm(w, 0.0, max_segments=None).max() + 1
    assert n_free > 10
    for m in (1, 3, 10):
        lab = cut_ucm(w, 0.0, max_segments=m)
        n = lab.max() + 1
        assert 1 <= n <= m
        # the threshold is raised to the *smallest* level giving <= m regions
        k = next(k for k in range(256) if num_regions(w, k) <= m)
        assert n == num_regions(w, k)
    assert seg["labels"].max() + 1 <= 48


def test_three_blocks_three_segments():
    img = np.zeros((40, 90, 3), np.uint8)
    img[:, :30] = (220, 30, 30)
    img[:, 30:60] = (30, 200, 30)
    img[:, 60:] = (30, 30, 220)
    out = compute_segments(img, build_detector("classical"))
    lab = out["labels"]
    assert lab.max() + 1 == 3
    assert len(np.unique(lab[:, :25])) == 1 and len(np.unique(lab[:, 35:55])) == 1
    assert len({lab[20, 10], lab[20, 45], lab[20, 80]}) == 3


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 5), (5, 1), (3, 2)])
def test_tiny_images(shape):
    img = np.random.default_rng(1).integers(0, 255, shape + (3,), dtype=np.uint8)
    out = compute_segments(img, build_detector("classical"))
    assert out["labels"].shape == shape
    assert out["ucm"].shape == shape + (2,)
    assert out["labels"].min() == 0
    n = out["labels"].max() + 1
    assert np.array_equal(np.unique(out["labels"]), np.arange(n))
    assert ucm_to_boundary_map(out["ucm"]).shape == shape


def test_owt_changes_weights_and_boundary_map(seg):
    cm = build_detector("classical")(_textured_image())
    u1 = owt_ucm(cm, oriented=True)
    u0 = owt_ucm(cm, oriented=False)
    assert u1.shape == (48, 64)
    assert not np.array_equal(u0.weights, u1.weights)
    b = ucm_to_boundary_map(u1)
    assert b.dtype == np.float32 and 0 <= b.min() and b.max() <= 1
    # thresholding the boundary map gives exactly the boundaries of the cut
    lab = cut_ucm(u1, 0.2, None)
    k = math.floor(0.2 * 255 + 1e-6)
    assert np.array_equal(b[:-1, :-1] * 255 > k + 0.5, _corner_boundaries(lab)[:-1, :-1])


def _corner_boundaries(lab):
    H, W = lab.shape
    out = np.zeros((H, W), bool)
    r = np.zeros((H, W), bool)
    d = np.zeros((H, W), bool)
    r[:, :-1] = lab[:, :-1] != lab[:, 1:]
    d[:-1] = lab[:-1] != lab[1:]
    out |= r | d
    out[:-1] |= r[1:]
    out[:, :-1] |= d[:, 1:]
    return out


def test_orientation_encoding_roundtrip():
    th = np.array([0.0, 0.5, math.pi / 2, math.pi - 1e-4], np.float32)
    q = encode_orientation(th)
    assert q.dtype == np.uint8 and q.max() < 180
    back = decode_orientation(q)
    d = np.abs(np.mod(back - th + math.pi / 2, math.pi) - math.pi / 2)
    assert d.max() < math.radians(0.6)


def test_contourmap_validation():
    with pytest.raises(ValueError):
        ContourMap(np.zeros((3, 3)), np.zeros((3, 4)))


def test_min_area_merges_watershed_slivers():
    """A thin bright line next to an edge makes sliver regions; min_area merges them away."""
    from clips4.pipeline.contours import build_detector
    from clips4.pipeline.segments import compute_segments

    rng = np.random.default_rng(0)
    img = np.full((90, 120, 3), 60, np.uint8)
    img[:, 60:] = 200
    img[:, 57] = 255  # a one-pixel line beside the step edge
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    det = build_detector("classical")
    limit = 3e-3 * img.shape[0] * img.shape[1]  # 32 px
    raw = np.bincount(compute_segments(img, det, min_area=0.0, ucm_threshold=0.05)["labels"].ravel())
    assert raw.min() < limit  # the sliver is there without the filter
    labels = compute_segments(img, det, min_area=3e-3, ucm_threshold=0.05)["labels"]
    areas = np.bincount(labels.ravel())
    assert areas.min() >= limit and len(areas) == len(raw) - (raw < limit).sum()
    assert labels.max() >= 1  # the real edge survives
