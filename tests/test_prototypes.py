"""Segments, segment embeddings, known / unknown prototypes and the PrototypeSet table."""
from __future__ import annotations

import numpy as np

from clips4.pipeline.grid import pixel_to_cell
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clips4.pipeline.prototypes import (
    PrototypeSet,
    brute_force_known_prototypes,
    cluster_segments,
    iter_embedding_batches,
    known_prototypes,
    labels_to_grid,
    segment_embeddings,
    unknown_prototypes,
)


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batches(ids, emb, size):
    for s in range(0, len(ids), size):
        yield ids[s:s + size], emb[s:s + size]


# ------------------------------------------------------------------------------------------------ segments
def test_cluster_segments_finds_regions_and_is_seeded():
    rng = np.random.default_rng(0)
    dirs = _unit(rng.standard_normal((3, 16)))
    region = np.zeros((12, 18), int)
    region[:, 6:12] = 1
    region[6:, 12:] = 2
    feats = _unit(dirs[region] + 0.05 * rng.standard_normal((12, 18, 16))).astype(np.float16)
    lab = cluster_segments(feats, n_clusters=3, seed=0)
    assert lab.shape == (12, 18) and lab.dtype == np.int32
    assert sorted(np.unique(lab)) == [0, 1, 2]
    # a bijection between found clusters and true regions
    pairs = {(a, b) for a, b in zip(region.ravel(), lab.ravel())}
    assert len(pairs) == 3
    np.testing.assert_array_equal(lab, cluster_segments(feats, n_clusters=3, seed=0))
    # more clusters than points; labels stay consecutive
    small = cluster_segments(feats[:1, :2], n_clusters=8)
    assert small.shape == (1, 2) and set(np.unique(small)) <= {0, 1}


def test_segment_embeddings_grid_labels():
    rng = np.random.default_rng(1)
    feats = _unit(rng.standard_normal((4, 6, 8)))
    lab = np.zeros((4, 6), int)
    lab[:, 3:] = 5
    lab[0, 0] = -1  # no segment
    ids, emb, area, bbox = segment_embeddings(feats, lab)
    np.testing.assert_array_equal(ids, [0, 5])
    m0 = feats[lab == 0].mean(0)
    np.testing.assert_allclose(emb[0], m0 / np.linalg.norm(m0), atol=1e-6)
    np.testing.assert_array_equal(area, [11, 12])
    np.testing.assert_array_equal(bbox, [[0, 0, 4, 3], [0, 3, 4, 6]])
    assert emb.dtype == np.float32 and ids.dtype == np.int64
    # bbox in image pixels: 4x6 grid over a 30x50 image
    _, _, _, bb = segment_embeddings(feats, lab, image_hw=(30, 50))
    np.testing.assert_array_equal(bb, [[0, 0, 30, 25], [0, 25, 30, 50]])
    d = dict(segment_embeddings(feats, lab))
    assert set(d) == {"segment_id", "embedding", "area", "bbox"}


def test_segment_embeddings_image_resolution_labels_area_weighted():
    rng = np.random.default_rng(2)
    h, w, H, W = 3, 4, 30, 41  # W not a multiple of w: uneven cells
    feats = _unit(rng.standard_normal((h, w, 8)))
    lab = rng.integers(0, 6, (H, W))
    lab[0, 0] = 99  # a one-pixel superpixel survives
    ids, emb, area, bbox = segment_embeddings(feats, lab)
    # reference: nearest-upsample features to the image by the alignment contract, then mean per label
    ry, rx = pixel_to_cell(H, W, h, w)
    up = feats[ry][:, rx]
    for i, s in enumerate(ids):
        m = up[lab == s].astype(np.float64).mean(0)
        np.testing.assert_allclose(emb[i], m / np.linalg.norm(m), atol=1e-5)
        assert area[i] == (lab == s).sum()
        ys, xs = np.nonzero(lab == s)
        np.testing.assert_array_equal(bbox[i], [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    assert 99 in ids


def test_labels_to_grid_majority():
    lab = np.zeros((4, 6), int)  # 2x3 grid: each cell is 2x2 pixels
    lab[:, 3:] = 7
    lab[0:2, 0:2] = 3  # cell (0, 0): all 3
    lab[2:4, 4:6] = -1
    lab[3, 5] = 7  # cell (1, 2): one 7 among "no segment" pixels -> 7 (negatives never win)
    lab[2:4, 0] = 2
    lab[2:4, 1] = 1  # cell (1, 0): 1 and 2 tie -> the smaller, 1
    g = labels_to_grid(lab, (2, 3))
    np.testing.assert_array_equal(g, [[3, 0, 7], [1, 0, 7]])  # cells (0, 1), (1, 1): 0 and 7 tie -> 0
    assert g.dtype == np.int32
    np.testing.assert_array_equal(labels_to_grid(np.full((4, 6), -1), (2, 3)), np.full((2, 3), -1))


# ------------------------------------------------------------------------------------------------ known prototypes
def _data(n=3000, d=32, k=7, seed=0):
    rng = np.random.default_rng(seed)
    E = _unit(rng.standard_normal((n, d)))
    T = _unit(rng.standard_normal((k, d)))
    ids = (rng.permutation(n) * 5 + 11).astype(np.int64)
    # exact duplicates in different batches and positions: must tie and be ordered by id
    for j in (17, 1234, 2999):
        if j < n:
            E[j] = E[3]
    T[2] = E[3]  # the duplicates are class 2's best segments
    return ids, E, T


@pytest.mark.parametrize("batch", [1, 64, 1000, 5000])
def test_streaming_equals_brute_force(batch):
    ids, E, T = _data()
    want = brute_force_known_prototypes(_batches(ids, E, 3000), T, 100.0, top_m=10, return_scores=True)
    got = known_prototypes(_batches(ids, E, batch), T, 100.0, top_m=10, return_scores=True)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[2], want[2])
    assert got[0].shape == (7, 32) and got[1].shape == (7, 10) and got[1].dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(got[0], axis=1), 1.0, atol=1e-6)
    dup_ids = sorted(ids[[3, 17, 1234, 2999]])
    assert list(got[1][2, :4]) == dup_ids  # ties broken by segment id
    assert np.all(np.diff(got[2], axis=1) <= 0)  # best first


def test_ranking_is_softmax_over_classes_not_raw_similarity():
    t0, t1 = np.eye(4, dtype=np.float32)[:2]
    a = _unit([0.7, 0.7, 0.1, 0.0])  # most similar to class 0, but just as similar to class 1
    b = _unit([0.5, -0.5, 0.7, 0.0])  # less similar to class 0, yet unambiguous
    T = np.stack([t0, t1])
    E = np.stack([a, b])
    assert E[0] @ t0 > E[1] @ t0
    _, sup = known_prototypes((np.array([0, 1]), E), T, 100.0, top_m=1)
    assert sup[0, 0] == 1


def test_fewer_segments_than_m_and_class_free():
    ids, E, T = _data(n=5)
    protos, sup = known_prototypes(_batches(ids, E, 2), T, 100.0, top_m=8)
    assert sup.shape == (7, 8) and (sup[:, 5:] == -1).all() and (sup[:, :5] >= 0).all()
    ref = brute_force_known_prototypes(_batches(ids, E, 5), T, 100.0, top_m=8)
    np.testing.assert_array_equal(sup, ref[1])
    np.testing.assert_array_equal(protos, ref[0])
    p0, s0 = known_prototypes(_batches(ids, E, 2), np.zeros((0, 32), np.float32), 100.0, top_m=8)
    assert p0.shape == (0, 32) and s0.shape == (0, 8)


# ------------------------------------------------------------------------------------------------ unknown prototypes
def test_unknown_prototypes_seeded_and_batch_independent():
    ids, E, _ = _data(n=2000)
    p1, i1 = unknown_prototypes(_batches(ids, E, 100), u=16, seed=3)
    p2, i2 = unknown_prototypes(_batches(ids[::-1], E[::-1], 777), u=16, seed=3)  # other order, other batches
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (16, 32) and len(set(i1)) == 16
    row = {int(s): j for j, s in enumerate(ids)}
    np.testing.assert_allclose(p1, E[[row[int(s)] for s in i1]], atol=1e-6)
    _, i3 = unknown_prototypes(_batches(ids, E, 100), u=16, seed=4)
    assert set(i3) != set(i1)
    p4, i4 = unknown_prototypes((ids[:5], E[:5]), u=64)
    assert p4.shape == (5, 32) and sorted(i4) == sorted(ids[:5])
    # roughly uniform: over many seeds every segment of a small set is drawn about equally often
    counts = np.zeros(20)
    for s in range(400):
        counts[unknown_prototypes(np.asarray(E[:20]), u=5, seed=s)[1]] += 1
    assert counts.min() > 50 and counts.max() < 150  # expectation 100


def test_unknown_prototypes_come_from_segments_the_known_classes_explain_least():
    ids, E, T = _data(n=3000)
    from clips4.pipeline.prototypes import _canonical_log_probs

    best = _canonical_log_probs(E, T, 100.0).max(axis=0)  # (N,) max known-class log-probability
    p1, i1 = unknown_prototypes(_batches(ids, E, 100), u=16, seed=3, text_emb=T, logit_scale=100.0, pool=0.25)
    p2, i2 = unknown_prototypes(_batches(ids[::-1], E[::-1], 777), u=16, seed=3, text_emb=T, logit_scale=100.0,
                                pool=0.25)
    np.testing.assert_array_equal(i1, i2)  # still seeded and batch-independent
    np.testing.assert_array_equal(p1, p2)
    row = {int(s): j for j, s in enumerate(ids)}
    chosen = best[[row[int(s)] for s in i1]]
    # every drawn segment is among the least explained quarter (of the 3000: the sample is all of them here)
    assert chosen.max() <= np.quantile(best, 0.25) + 1e-9
    _, uni = unknown_prototypes(_batches(ids, E, 100), u=16, seed=3)
    assert np.median(best[[row[int(s)] for s in uni]]) > chosen.max()  # the uniform draw is not
    # pool = 1 is the paper's uniform draw, whatever the text
    _, i_all = unknown_prototypes(_batches(ids, E, 100), u=16, seed=3, text_emb=T, pool=1.0)
    np.testing.assert_array_equal(i_all, uni)
    with pytest.raises(ValueError, match="pool"):
        unknown_prototypes(_batches(ids, E, 100), u=4, text_emb=T, pool=0.0)


# ------------------------------------------------------------------------------------------------ tables
def test_prototype_set_table_round_trip(tmp_path):
    ids, E, T = _data()
    known, sup = known_prototypes(_batches(ids, E, 500), T, 100.0, top_m=4)
    unk, uids = unknown_prototypes(_batches(ids, E, 500), u=3)
    names = [f"class{i}" for i in range(7)]
    ps = PrototypeSet.from_parts(names, known, sup, unk, uids, meta={"top_m": 4})
    assert ps.names[-1] == "unknown_02" and ps.n_known == 7 and ps.n_unknown == 3 and ps.dim == 32
    t = ps.to_table()
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 32)
    assert t.schema.field("support").type == pa.list_(pa.int64())
    ps.save(str(tmp_path / "p.parquet"))
    back = PrototypeSet.load(str(tmp_path / "p.parquet"))
    assert back.names == ps.names and back.kinds == ps.kinds and back.meta == {"top_m": 4}
    np.testing.assert_array_equal(back.vectors, ps.vectors)
    for a, b in zip(back.support, ps.support):
        np.testing.assert_array_equal(a, b)
    # class-free: only unknowns
    free = PrototypeSet.from_parts([], np.zeros((0, 0), np.float32), np.zeros((0, 4), np.int64), unk, uids)
    assert free.kinds == ["unknown"] * 3 and PrototypeSet.from_table(free.to_table()).dim == 32


def test_iter_embedding_batches_formats(tmp_path):
    rng = np.random.default_rng(5)
    E = rng.standard_normal((10, 4)).astype(np.float32)
    rid = np.arange(100, 110)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(E.ravel()), 4)
    var = pa.array(E.tolist(), pa.list_(pa.float32()))
    binary = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), 10, [None, pa.py_buffer(E.tobytes())])
    for col in (fixed, var, binary):
        pq.write_table(pa.table({"row_id": rid, "embedding": col}), tmp_path / "s.parquet")
        got = list(iter_embedding_batches(str(tmp_path / "s.parquet"), batch_size=4))
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), rid)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), E)
    got = list(iter_embedding_batches(pa.table({"embedding": fixed}), id_column=None, batch_size=3))
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), np.arange(10))


@pytest.mark.parametrize("noise", [0.05, 0.5, 3.0])
def test_streaming_equals_brute_force_clustered(noise):
    """Segments scattered around the class texts: from saturated (p ~ 1 - 1e-30) to ambiguous probabilities."""
    rng = np.random.default_rng(7)
    T = _unit(rng.standard_normal((12, 64)))
    E = _unit(T[rng.integers(0, 12, 4000)] + noise * rng.standard_normal((4000, 64)) / 8)
    ids = rng.permutation(4000).astype(np.int64)
    want = brute_force_known_prototypes((ids, E), T, 100.0, top_m=16, return_scores=True)
    got = known_prototypes(_batches(ids, E, 333), T, 100.0, top_m=16, return_scores=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_torch_path_gives_the_same_prototypes():
    """The device path (torch; CUDA on GPU machines, checked here on the CPU) equals the numpy one exactly."""
    pytest.importorskip("torch")
    from clips4.pipeline.prototypes import known_prototypes

    rng = np.random.default_rng(3)
    E = rng.standard_normal((3000, 32)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    E[1500:1510] = E[0]  # exact duplicates must tie the same way
    T = rng.standard_normal((7, 32)).astype(np.float32)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    batches = [(np.arange(i, i + 700), E[i:i + 700]) for i in range(0, 3000, 700)]
    p_np, s_np = known_prototypes(batches, T, 100.0, top_m=16)
    p_t, s_t = known_prototypes(batches, T, 100.0, top_m=16, device="cpu")
    np.testing.assert_array_equal(s_t, s_np)
    np.testing.assert_array_equal(p_t, p_np)


def _near_tie_data(seed=11, n=6000, d=48, k=32, m=16):
    """Segments around the class texts from confident (p ~ 1 - 1e-30) to ambiguous, three classes whose texts nearly
    coincide (their best segments have p < 1/2), a class between two others with no segment of its own, and
    copies of the best and of the m-th best segments of some classes, exact and one float32 step apart, in other
    batches: ties and near-ties at the top and at the threshold."""
    from clips4.pipeline.prototypes import _canonical_log_probs

    rng = np.random.default_rng(seed)
    T = _unit(rng.standard_normal((k, d)))
    T[1:3] = _unit(T[0] + 1e-3 * rng.standard_normal((2, d)))
    T[5] = _unit(T[3] + T[4])  # no segment of its own: its m-th best is a segment of class 3 or 4, p_5 < 1/2
    noise = np.repeat([0.02, 0.2, 1.0], n // 3 + 1)[:n, None]
    centre = rng.choice(np.delete(np.arange(k), 5), n)
    E = _unit(T[centre] + noise * rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    lp = _canonical_log_probs(E, T, 100.0)
    free = iter(rng.permutation(n))
    for c in (0, 3, 4):
        ranked = np.argsort(-lp[c], kind="stable")
        for src in (ranked[0], ranked[m - 1]):
            for _ in range(2):
                E[next(free)] = E[src]  # exact ties
            near = E[src].copy()
            j = rng.integers(d)
            near[j] = np.nextafter(near[j], np.float32(2))
            E[next(free)] = near
    ids = rng.permutation(n).astype(np.int64) * 3 + 7
    return ids, E, T


@pytest.mark.parametrize("data", ["near ties", "two classes"])
def test_bound_keeps_every_row_that_can_enter(data):
    """The cheap bound (two largest logits per row) never discards a row whose exact score reaches a class's
    threshold, ties included, and does discard most rows once thresholds are confident. With two classes the
    bound is the exact score itself, so only its error margin keeps the rows that score the threshold exactly."""
    from clips4.pipeline.prototypes import _bounded_candidates, _canonical_log_probs

    if data == "near ties":
        ids, E, T = _near_tie_data()
    else:
        rng = np.random.default_rng(4)
        E, T = _unit(rng.standard_normal((4000, 32))), _unit(rng.standard_normal((2, 32)))
    ls = 100.0
    exact = _canonical_log_probs(E, T, ls)  # (K, n)
    lg = E @ np.ascontiguousarray(T.T * np.float32(ls))
    eps = float(np.finfo(np.float32).eps)
    delta = ls * (E.shape[1] + 4) * eps * float(np.linalg.norm(E, axis=1).max()) * float(
        np.linalg.norm(T, axis=1).max())
    pruned = 0
    for rank in (0, 3, 15, 31, 300, 1000):
        thr = -np.sort(-exact, axis=1)[:, rank]  # some row scores exactly the threshold: a tie that must be kept
        rows = _bounded_candidates(lg.copy(), thr, delta)
        if rows is None:  # too many weak classes: the caller tests every row
            continue
        need = np.flatnonzero((exact >= thr[:, None]).any(axis=0))
        assert np.isin(need, rows).all(), rank
        pruned += len(rows) < len(E) // 2
    assert pruned >= 3  # the bound leaves most rows out
    thr = -np.sort(-exact, axis=1)[:, 31]
    tight, loose = _bounded_candidates(lg.copy(), thr, delta), _bounded_candidates(lg.copy(), thr, 10 * delta)
    assert set(tight) <= set(loose)  # a looser margin keeps a superset


@pytest.mark.parametrize("batch", [97, 1000, 6000])
def test_bounded_search_equals_softmax_test_and_brute_force(batch, monkeypatch):
    """Streaming with the bound, without it (every row through the float32 softmax test) and the brute-force
    reference select the same segments in the same order, with the same scores, on near-ties and duplicates."""
    import clips4.pipeline.prototypes as P

    ids, E, T = _near_tie_data()
    calls = []
    real = P._bounded_candidates
    monkeypatch.setattr(P, "_bounded_candidates", lambda *a: calls.append(r := real(*a)) or r)
    want = brute_force_known_prototypes((ids, E), T, 100.0, top_m=16, return_scores=True)
    got = known_prototypes(_batches(ids, E, batch), T, 100.0, top_m=16, return_scores=True)
    plain = known_prototypes(_batches(ids, E, batch), T, 100.0, top_m=16, return_scores=True, bound=False)
    for g, p, w in zip(got, plain, want):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(p, w)
    if batch < len(ids):
        assert any(r is not None and len(r) < batch // 2 for r in calls)  # the bound did the work
    # the near-identical texts 0-2 and the class in between (p < 1/2: the bound's "weak" classes) and confident
    # ones; copies tie
    assert np.all(want[2][[0, 1, 2, 5], -1] < 0.5) and np.all(want[2][3:5] > 0.99)
    row = {int(s): j for j, s in enumerate(ids)}
    for c in (0, 3, 4):
        sup = E[[row[int(s)] for s in want[1][c]]]
        assert len(np.unique(sup, axis=0)) < len(sup)
