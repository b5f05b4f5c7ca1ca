"""SegmentIndex (FAISS inner product, cached on disk) and contact sheets."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clips4.evaluate.search import SegmentIndex, contact_sheet, render_tile, segment_mask


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _data(n=500, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (np.arange(n, dtype=np.int64) * 7 + 3), _unit(rng.standard_normal((n, d)))


def test_index_query_matches_brute_force_and_round_trips(tmp_path):
    ids, E = _data()
    batches = [(ids[s:s + 128], E[s:s + 128]) for s in range(0, len(ids), 128)]
    path = tmp_path / "idx" / "segments.faiss"
    index = SegmentIndex.build(iter(batches), path=str(path))
    assert path.is_file() and index.ntotal == 500 and index.dim == 16
    q = _unit(np.random.default_rng(1).standard_normal(16))
    hits = index.query(q, top=10)
    sims = E @ q
    order = np.argsort(-sims)[:10]
    assert [h[0] for h in hits] == list(ids[order])
    np.testing.assert_allclose([h[1] for h in hits], sims[order], atol=1e-5)
    loaded = SegmentIndex.load(str(path))
    assert loaded.query(q, top=10) == hits
    assert len(loaded.query_batch(np.stack([q, -q]), top=3)) == 2
    assert len(index.query(q, top=10_000)) == 500  # capped at the index size
    with pytest.raises(ValueError):
        index.query(np.ones(8, np.float32))


def test_load_or_build_builds_once(tmp_path):
    ids, E = _data(n=50)
    calls = []

    def batches():
        calls.append(1)
        return iter([E])  # bare arrays: ids are the running row numbers

    p = str(tmp_path / "i.faiss")
    a = SegmentIndex.load_or_build(p, batches)
    b = SegmentIndex.load_or_build(p, batches)
    assert len(calls) == 1 and a.ntotal == b.ntotal == 50
    assert b.query(E[7], top=1)[0][0] == 7
    with pytest.raises(ValueError, match="no segment embeddings"):
        SegmentIndex.build(iter([]))


def test_hnsw_factory(tmp_path):
    ids, E = _data(n=300)
    index = SegmentIndex.build([(ids, E)], factory="HNSW16")
    assert index.query(E[5], top=1)[0][0] == ids[5]


def test_contact_sheet(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    mask = np.zeros((70, 80), bool)
    mask[20:40, 30:60] = True
    coarse = np.zeros((7, 8), bool)  # a grid-resolution mask is resized to the image
    coarse[2:4, 3:6] = True
    hits = [
        {"image_path": paths[0], "bbox": (10, 10, 30, 50), "score": 0.31, "image_id": "a", "segment_id": 4},
        {"image_path": paths[1], "mask": mask, "score": 0.29, "image_id": "b", "segment_id": 1},
        {"image_path": paths[2], "mask": coarse, "score": 0.27},
        {"image": np.zeros((20, 20, 3), np.uint8), "score": 0.2},
    ]
    out = contact_sheet(hits, str(tmp_path / "sheet" / "q.png"), title="a query", cols=2, thumb=96)
    im = Image.open(out)
    assert im.size == (2 * (96 + 6) + 6, 28 + 2 * (96 + 34 + 6) + 6)
    arr = np.asarray(im.convert("RGB"))
    assert ((arr[..., 0] == 255) & (arr[..., 1] == 40) & (arr[..., 2] == 40)).sum() > 20  # outlines drawn


RED = np.array([255, 40, 40])


def test_tile_shows_the_segment_filled_and_outlined_inside_it_only():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:100, :100]
    mask = (yy - 50) ** 2 + (xx - 50) ** 2 < 20 ** 2  # a disc: one region, one outline
    tile, m = render_tile(img, mask, thumb=100, context=1.0)  # crop = whole image, scale 1
    assert tile.shape == (100, 100, 3) and np.array_equal(m, mask)
    red = (tile == RED).all(-1)
    assert red.sum() > 100 and not (red & ~mask).any()  # the outline lies inside the segment
    ring = mask & ~np.pad(mask[2:-2, 2:-2] & mask[:-4, 2:-2] & mask[4:, 2:-2] & mask[2:-2, :-4] & mask[2:-2, 4:],
                          2)
    assert red[mask & ~ring].sum() == 0  # a thin line, not a filled disc
    inner = mask & ~red
    np.testing.assert_array_equal(tile[inner], img[inner])  # the segment keeps the image's colours
    out = tile[~mask].astype(int)
    assert (np.ptp(out, axis=-1) <= 1).all() and out.min() >= 140  # outside: grey and light


def test_tile_grid_mask_becomes_one_region():
    img = np.full((64, 64, 3), 100, np.uint8)
    grid = np.zeros((4, 4), bool)
    grid[1:3, 1:3] = True  # the feature grid, 16 px cells
    tile, m = render_tile(img, grid, thumb=64, context=10.0)
    from scipy import ndimage

    assert ndimage.label(m)[1] == 1 and 0.15 < m.mean() < 0.35  # one blob where the cells are
    assert m[32, 32] and not m[5, 5] and not m[60, 60]


def test_segment_mask_from_the_grid_without_a_segments_stage():
    class Feats:
        meta = {"deps": {}}

        def get(self, image_id, key):
            assert key == "segment_labels"
            return np.array([[0, 1], [1, 2]])

    np.testing.assert_array_equal(segment_mask(Feats(), "a", 1), [[False, True], [True, False]])


def test_sheet_title_keeps_its_spaces():
    from PIL import ImageDraw

    from clips4.evaluate.search import _font

    d = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    f = _font(16)
    # each space is drawn at least half an "o" wide (the bundled fonts' spaces let the words run together)
    assert d.textlength("a photo of a red car", font=f) - d.textlength("aphotoofaredcar", font=f) >= \
        5 * d.textlength("o", font=f) / 2
