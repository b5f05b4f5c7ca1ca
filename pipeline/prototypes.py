"""CLIP segments, segment embeddings and target class prototypes (paper Sec. 3.2, Fig. 3).

Per image (numpy in, numpy out, no torch):

* :func:`cluster_segments` – the segments Ŝ: spherical k-means over the L2-normalised CLIP pixel embeddings.
* :func:`labels_to_grid` – image-resolution labels (e.g. UCM superpixels) -> the feature grid, by majority.
* :func:`segment_embeddings` – ``i_s``: per segment, the normalised mean CLIP embedding, area and bbox.

Over the whole training set (streamed, never held whole):

* :func:`known_prototypes` – ``C_k = avg_m(top-m_s(softmax_k(logit_scale * sim(I, T))))``: per known class, the
  mean embedding of the ``m`` segments with the highest class probability (softmax over the K classes).
* :func:`unknown_prototypes` – ``C_u = random(clip-i(Ŝ), u)``: ``u`` randomly sampled segment embeddings.
* :class:`PrototypeSet` – names, kinds, vectors and support ids, as a pyarrow table.

A "segment batch" is a pair ``(ids (N,) int64, emb (N, D) float32)`` with globally unique segment ids (e.g. the
row ids of the segments table); :func:`iter_embedding_batches` streams them from Parquet / pyarrow.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from clips4.pipeline.grid import pixel_to_cell

__all__ = [
    "cluster_segments",
    "labels_to_grid",
    "segment_embeddings",
    "SegmentEmbeddings",
    "known_prototypes",
    "brute_force_known_prototypes",
    "unknown_prototypes",
    "PrototypeSet",
    "iter_embedding_batches",
]


def _l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)).astype(np.float32, copy=False)


# ================================================================================================ per image
def _segment_sums(labels: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
    """``(k, D) float32`` sums of the rows of ``X`` per label: a one-hot matmul, which runs on BLAS
    (``np.add.at`` is an unbuffered scalar loop, ~50x slower at 10^3 x 512)."""
    onehot = np.zeros((k, len(labels)), np.float32)
    onehot[labels, np.arange(len(labels))] = 1.0
    return onehot @ np.asarray(X, np.float32)


def cluster_segments(features: np.ndarray, n_clusters: int = 8, seed: int = 0, iters: int = 20) -> np.ndarray:
    """The CLIP segments Ŝ of one image: spherical k-means on its pixel embeddings.

    ``features`` ``(h, w, D)`` (float16/32; rows are re-normalised). Returns ``(h, w) int32`` labels, consecutive
    ``0..S-1`` (``S <= n_clusters``; clusters that end up empty are dropped and the rest renumbered in order).

    k-means++ seeding from ``np.random.default_rng(seed)``, then ``iters`` Lloyd steps with cosine similarity
    (assign to the most similar centroid, centroid = normalised mean). Plain numpy on purpose: an image has ~10^3
    points, so this is milliseconds, bit-for-bit deterministic, and starts no OpenMP thread pool inside every
    Ray worker (as faiss.Kmeans would).
    """
    h, w, D = features.shape
    X = _l2n(features.reshape(-1, D))
    n = X.shape[0]
    k = int(max(1, min(n_clusters, n)))
    rng = np.random.default_rng(seed)
    # k-means++ on cosine distance (1 - sim)
    C = np.empty((k, D), np.float32)
    C[0] = X[rng.integers(n)]
    dist = np.clip(1.0 - X @ C[0], 0, None)
    for j in range(1, k):
        tot = float(dist.sum())
        idx = int(rng.choice(n, p=dist / tot)) if tot > 0 else int(rng.integers(n))
        C[j] = X[idx]
        dist = np.minimum(dist, np.clip(1.0 - X @ C[j], 0, None))
    labels = np.zeros(n, np.int64)
    for it in range(max(1, iters)):
        sims = X @ C.T
        new = sims.argmax(axis=1)
        if it > 0 and np.array_equal(new, labels):
            break
        labels = new
        sums = _segment_sums(labels, X, k)
        counts = np.bincount(labels, minlength=k)
        for j in np.flatnonzero(counts == 0):  # empty cluster: re-seed at the worst-fitting point
            far = int(sims.max(axis=1).argmin())
            sums[j] = X[far]
        C = _l2n(sums)
    _, inv = np.unique(labels, return_inverse=True)
    return inv.reshape(h, w).astype(np.int32)


def labels_to_grid(labels: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Image-resolution labels ``(H, W)`` -> ``(h, w) int32`` labels at the feature grid, by **majority**: each cell
    takes the label covering most of its pixels (ties -> the smaller label). Negative labels are "no segment"
    and never win over a real label; a cell with only negative pixels gets ``-1``. Labels keep their values
    (small superpixels that win no cell disappear at the grid; :func:`segment_embeddings` with image-resolution
    labels keeps them instead)."""
    labels = np.asarray(labels)
    H, W = labels.shape
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if (H, W) == (h, w):
        return labels.astype(np.int32)
    cy, cx = pixel_to_cell(H, W, h, w)
    cell = (cy[:, None] * w + cx[None, :]).ravel()
    lab = labels.ravel().astype(np.int64)
    valid = lab >= 0
    out = np.full(h * w, -1, np.int64)
    if valid.any():
        ids, inv = np.unique(lab[valid], return_inverse=True)
        key = cell[valid] * len(ids) + inv
        uk, cnt = np.unique(key, return_counts=True)
        kc, ki = uk // len(ids), uk % len(ids)
        # within a cell, highest count first, then smaller label (keys are sorted by cell, then label)
        order = np.lexsort((ki, -cnt, kc))
        kc, ki = kc[order], ki[order]
        first = np.ones(len(kc), bool)
        first[1:] = kc[1:] != kc[:-1]
        out[kc[first]] = ids[ki[first]]
    return out.reshape(h, w).astype(np.int32)


class SegmentEmbeddings(NamedTuple):
    """Result of :func:`segment_embeddings`. A 4-tuple (``ids, emb, area, bbox = ...``) that also converts with
    ``dict(...)`` into table columns ``segment_id, embedding, area, bbox``."""

    segment_id: np.ndarray  #: (S,) int64, the label values, ascending
    embedding: np.ndarray   #: (S, D) float32, L2-normalised mean CLIP embedding (i_s)
    area: np.ndarray        #: (S,) int64, size in the labels' own units (grid cells or pixels)
    bbox: np.ndarray        #: (S, 4) int32, y0, x0, y1, x1 (end exclusive)

    def keys(self):
        return self._fields

    def __getitem__(self, key):  # dict(...) support; ints and slices behave as a tuple
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


def segment_embeddings(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    image_hw: tuple[int, int] | None = None,
) -> SegmentEmbeddings:
    """Segment embeddings ``i_s = normalise(sum_{p in s} clip-i(p) / |s|)`` of one image.

    ``features`` ``(h, w, D)`` CLIP pixel embeddings at the feature grid; ``labels`` either ``(h, w)`` (segments at
    the grid, e.g. from :func:`cluster_segments`) or at any other resolution ``(H, W)`` covering the whole image
    (e.g. UCM superpixels at image resolution). Negative labels mean "no segment" and are skipped.

    * Grid labels: plain mean over the segment's cells; ``area`` in cells; ``bbox`` in grid cells, or in image
      pixels when ``image_hw=(H, W)`` is given (cells ``[y0, y1)`` span pixels ``[floor(y0*H/h), ceil(y1*H/h))``).
    * Labels at another resolution: each pixel takes the embedding of the grid cell it lies in (nearest, the
      alignment contract), and the segment's embedding is the mean over its pixels – i.e. an area-weighted mean of
      the cells it overlaps. No superpixel is lost, however small. ``area`` and ``bbox`` are in the labels' pixels.
    """
    feats = np.asarray(features)
    h, w, D = feats.shape
    labels = np.asarray(labels)
    H, W = labels.shape
    F = feats.reshape(-1, D).astype(np.float32, copy=False)
    lab = labels.ravel().astype(np.int64)
    valid = lab >= 0
    if not valid.any():
        return SegmentEmbeddings(np.zeros(0, np.int64), np.zeros((0, D), np.float32), np.zeros(0, np.int64),
                                 np.zeros((0, 4), np.int32))
    ids, inv = np.unique(lab[valid], return_inverse=True)
    S = len(ids)
    if (H, W) == (h, w):
        cells = np.flatnonzero(valid)
        sums = _segment_sums(inv, F[cells], S)
    else:
        import scipy.sparse as sp

        cy, cx = pixel_to_cell(H, W, h, w)
        cell = (cy[:, None] * w + cx[None, :]).ravel()[valid]
        # (segment, cell) -> number of the segment's pixels in that cell; sums = overlap matrix @ cell features
        M = sp.coo_matrix((np.ones(len(inv), np.float64), (inv, cell)), shape=(S, h * w)).tocsr()
        sums = M @ F.astype(np.float64)
    emb = _l2n(sums)
    area = np.bincount(inv, minlength=S).astype(np.int64)

    from scipy import ndimage

    relab = np.zeros(H * W, np.int32)
    relab[valid] = inv + 1
    objs = ndimage.find_objects(relab.reshape(H, W), max_label=S)
    bbox = np.array([[o[0].start, o[1].start, o[0].stop, o[1].stop] for o in objs], np.int64).reshape(-1, 4)
    if image_hw is not None and (H, W) == (h, w):
        IH, IW = int(image_hw[0]), int(image_hw[1])
        bbox = np.stack([
            (bbox[:, 0] * IH) // h, (bbox[:, 1] * IW) // w,
            np.minimum(-((-bbox[:, 2] * IH) // h), IH), np.minimum(-((-bbox[:, 3] * IW) // w), IW),
        ], axis=1)
    return SegmentEmbeddings(ids.astype(np.int64), emb, area, bbox.astype(np.int32))


# ================================================================================================ streaming
def iter_embedding_batches(
    source,
    *,
    emb_column: str = "embedding",
    id_column: str | None = "row_id",
    batch_size: int = 65536,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(ids (n,) int64, emb (n, D) float32)`` batches from a Parquet file or folder (path/URL), a
    ``pyarrow.Table``, a ``pyarrow.dataset.Dataset`` or an iterable of ``pyarrow.RecordBatch`` (e.g.
    ``StageReader.iter_table``). ``emb_column`` is a ``fixed_size_list<float>``, ``list<float>``
    or ``fixed_size_binary(4*D)`` (raw float32 bytes; several times faster to decode from Parquet) column; with ``id_column=None`` the ids are the running row numbers."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    import os

    import pyarrow.parquet as pq

    from clips4.pipeline.cache import float_rows_numpy

    cols = [emb_column] + ([id_column] if id_column else [])
    if isinstance(source, pa.Table):
        it = source.to_batches(max_chunksize=batch_size)
    elif not isinstance(source, (str, os.PathLike, ds.Dataset)):
        it = source  # record batches already
    elif isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        # a single local file: ParquetFile.iter_batches decodes ~3x faster and holds less than a dataset scan
        it = pq.ParquetFile(str(source), pre_buffer=False).iter_batches(batch_size=batch_size, columns=cols)
    else:
        dset = source if isinstance(source, ds.Dataset) else ds.dataset(str(source), format="parquet")
        # little readahead: each batch of 512-d rows is ~128 MiB, and pyarrow's default (16 batches ahead) would
        # hold gigabytes and run decoding threads that compete with the consumer for the same cores
        it = dset.to_batches(columns=cols, batch_size=batch_size, batch_readahead=1, fragment_readahead=1)
    offset = 0
    for b in it:
        if b.num_rows == 0:
            continue
        emb = float_rows_numpy(b.column(b.schema.get_field_index(emb_column)))
        if id_column:
            ids = b.column(b.schema.get_field_index(id_column)).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            ids = np.arange(offset, offset + b.num_rows, dtype=np.int64)
        offset += b.num_rows
        yield ids, emb


def prefetch(iterable, depth: int = 1) -> Iterator:
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead: decoding the next Parquet batch
    (pyarrow releases the GIL) overlaps the GEMM on the current one instead of following it. Exceptions reach the
    consumer; a consumer that stops early stops the thread at its next item."""
    import queue
    import threading

    q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def run() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put((end, exc))

    t = threading.Thread(target=run, name="clips4-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item, exc = q.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def _as_batches(source, ahead: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Accept an iterable of (ids, emb) batches, one (ids, emb) pair, or a bare (N, D) array (ids = row numbers).
    A stream is read ``ahead`` batches ahead in a thread (:func:`prefetch`; 0 = in the consumer's thread)."""
    if isinstance(source, np.ndarray):
        yield np.arange(len(source), dtype=np.int64), source
        return
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], np.ndarray) and source[1].ndim == 2:
        yield np.asarray(source[0], np.int64), source[1]
        return
    it = source if isinstance(source, (list, tuple)) or ahead <= 0 else prefetch(source, ahead)
    for ids, emb in it:
        yield np.asarray(ids, dtype=np.int64).reshape(-1), np.asarray(emb)


def _canonical_log_probs(emb: np.ndarray, text: np.ndarray, logit_scale: float) -> np.ndarray:
    """``(K, n) float64`` log softmax over classes of ``logit_scale * cos``, computed so that a segment's scores
    do not depend on which other rows share its batch.

    float32 BLAS results change in the last bits with a row's position in the matrix (measured here: identical
    rows get different float32 dot products), which would make streaming and one-shot rankings disagree and
    exact duplicates not tie. So the similarities are computed in float64 (products of float32 numbers are exact
    there) and rounded to float32, which collapses the summation-order noise (barring a ~1e-9 chance of straddling
    a rounding boundary); the softmax then works per column with reductions over the class axis only.

    The log-probability is ``(l_k - l_max) - log1p(sum_{j not max} exp(l_j - l_max))`` so that confident segments
    (p = 1 - 1e-20 with a logit scale of 100) keep distinct, correctly ordered scores instead of all rounding to 0.
    """
    s = (text.astype(np.float64) @ np.asarray(emb, np.float64).T).astype(np.float32)
    a = s.astype(np.float64) * float(logit_scale)
    a -= a.max(axis=0, keepdims=True)
    top = a == 0.0
    e = np.exp(a)
    e[top] = 0.0
    rest = e.sum(axis=0) + (top.sum(axis=0) - 1)  # ties at the maximum count fully
    return a - np.log1p(rest)


def _approx_log_probs_(lg: np.ndarray) -> np.ndarray:
    """In place: ``(n, K) float32`` logits -> log softmax over classes (same log1p form as the exact version)."""
    rows = np.arange(lg.shape[0])
    am = lg.argmax(axis=1)
    lg -= lg[rows, am][:, None]
    e = np.exp(lg)
    e[rows, am] = 0.0
    lg -= np.log1p(e.sum(axis=1))[:, None]
    return lg


def _torch_log_probs(E: np.ndarray, T: np.ndarray, logit_scale: float, device: str) -> np.ndarray:
    """:func:`_approx_log_probs_` of ``logit_scale * E @ T.T`` computed by torch on ``device``: ``(n, K) float32``."""
    import torch

    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 (10-bit mantissa) would break the float32 error margin
    try:
        with torch.no_grad():
            t = torch.as_tensor(T, device=device)
            lg = torch.as_tensor(E, device=device) @ t.T
            lg *= float(np.float32(logit_scale))
            am = lg.argmax(dim=1, keepdim=True)
            lg -= lg.gather(1, am)
            e = torch.exp(lg)
            e.scatter_(1, am, 0.0)
            lg -= torch.log1p(e.sum(dim=1, keepdim=True))
            return lg.cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def _bounded_candidates(lg: np.ndarray, thr: np.ndarray, delta: float) -> np.ndarray | None:
    """The rows of a batch that may still enter some class's top-m, by a bound that needs only each row's two
    largest logits: a sorted index array (every other row provably enters no class), or ``None`` where too many
    classes are weak for the bound to pay off (then every row goes through the float32 softmax test).

    ``lg`` ``(n, K)``: the batch's float32 logits, each within ``delta`` of the exact ones that
    :func:`_canonical_log_probs` ranks by; ``thr`` ``(K,)``: every class's exact m-th best log-probability so far
    (finite: all classes hold m segments). A row enters class ``k`` only with an exact ``log p_k >= thr_k``. Any
    two classes bound the log-sum-exp from below, so ``log p_k <= -softplus(l_j - l_k)`` for every ``j != k``;
    with ``j`` the best other class, the row can enter ``k`` only if ``l_j - l_k <= G_k = log(expm1(-thr_k))``:

    * ``k`` the row's (approximate) arg-max: its lead over the runner-up must be at least ``-G_k``. Once a class
      holds confident segments (``p`` near 1, ``G_k`` very negative), few rows have that lead.
    * any other class: it must come within ``G_k`` of the row's maximum, possible only where ``G_k >= 0``
      (``thr_k <= -log 2``: "weak" classes, whose m-th best segment has ``p <= 1/2``).

    The test is loosened by ``2 * delta`` (the two logits' errors) and by far more than the float64 rounding of
    ``G`` and of the exact scores (``thr`` scaled by ``1 + 1e-9``), so ties with ``thr`` stay in."""
    n, K = lg.shape
    thr = np.asarray(thr, np.float64) * (1.0 + 1e-9) - 1e-300  # < 0 even where thr = 0 (p = 1 exactly)
    G = np.log(np.expm1(-thr))
    slack = G + 2.0 * delta + 1e-9 * (1.0 + np.abs(G))  # keep (k, row) where best other logit - l_k <= slack_k
    weak = np.flatnonzero(~(slack < 0))  # NaN counts as weak
    if len(weak) > max(1, K // 8):
        return None
    rows = np.arange(n)
    am = lg.argmax(axis=1)
    mx = lg[rows, am]
    lg[rows, am] = -np.inf
    s2 = lg.max(axis=1)  # the runner-up (-inf when K = 1: every row is kept)
    lg[rows, am] = mx
    mx64 = mx.astype(np.float64)
    keep = mx64 - s2 >= -slack[am]
    for k in weak:
        keep |= lg[:, k] >= mx64 - slack[k]
    return np.flatnonzero(keep)


def _finish(score: np.ndarray, ids: np.ndarray, embs: np.ndarray):
    K, m = ids.shape
    D = embs.shape[-1]
    protos = np.zeros((K, D), np.float32)
    for k in range(K):
        ok = ids[k] >= 0
        if ok.any():
            protos[k] = embs[k][ok].astype(np.float64).mean(axis=0)
    return _l2n(protos), ids, np.where(ids >= 0, np.exp(score), 0.0)


def known_prototypes(
    segment_batches: Iterable[tuple[np.ndarray, np.ndarray]],
    text_emb: np.ndarray,
    logit_scale: float,
    top_m: int = 32,
    *,
    return_scores: bool = False,
    device: str | None = None,
    prefetch_batches: int = 1,
    bound: bool = True,
):
    """Known-class prototypes ``C_k`` (paper Sec. 3.2, Fig. 3b), streamed (``prefetch_batches`` read ahead in a
    thread while the current one is scored; 0 = one after the other).

    ``segment_batches``: iterable of ``(ids (N,) int64, emb (N, D) float32 L2-normalised)`` (see module doc);
    ``text_emb``: ``(K, D)`` class text embeddings (:func:`clips4.pipeline.backends.text_embeddings`);
    ``logit_scale``: CLIP's temperature (100 for OpenAI CLIP).

    Every segment gets ``p_k = softmax_k(logit_scale * sim(i_s, t_k))`` over the K classes; per class, the ``top_m``
    segments with the highest ``p_k`` (ties: smaller segment id first) are averaged and re-normalised.

    Returns ``protos (K, D) float32`` L2-normalised and ``support_ids (K, top_m) int64`` ordered by decreasing
    probability (``-1`` pads when fewer than ``top_m`` segments exist), plus ``scores (K, top_m) float64`` (the
    probabilities) with ``return_scores=True``. ``K = 0`` (class-free) returns empty arrays.

    How (why not a FAISS index here): the ranking key is a softmax *over classes*, which depends on all K
    similarities of a segment, so it is not an inner-product search that an index over segments could answer;
    what is needed is every segment-class similarity once, i.e. a dense ``(N, D) x (D, K)`` GEMM per batch – the
    same BLAS kernel FAISS's flat search runs, minus its per-query heap. Per batch: a float32 GEMM gives
    approximate logits; once every class holds m segments, a bound on each row's two largest logits against the
    per-class running threshold (the current m-th best; :func:`_bounded_candidates`) discards almost every row
    without a softmax; the rows left (all rows while a class holds fewer than m, or with ``bound=False``) get
    approximate float32 log-probabilities, and the candidates within a safe (relative) error margin of the
    threshold are re-scored exactly (:func:`_canonical_log_probs`) and merged into a per-class top-m (score, id,
    embedding) buffer. Both tests only discard rows that provably cannot enter, so the result is the same with
    or without the bound, and equals :func:`brute_force_known_prototypes`. Memory is O(batch x K + K x m x D).

    ``device`` (e.g. ``"cuda"``): the per-batch GEMM and approximate log-softmax run in torch on that device
    (float32, TF32 off, so the error margin above still holds); only the ``(n, K)`` scores come back, and the
    threshold, exact re-scoring and merge stay on the CPU, so the result is the same. ``None``: numpy only.
    ``bound=False``: every row of every batch goes through the float32 softmax test (slower, same result).
    """
    T = np.ascontiguousarray(text_emb, dtype=np.float32)
    if T.ndim != 2:
        raise ValueError(f"text_emb must be (K, D), got shape {T.shape}")
    K, D = T.shape
    m = int(top_m)
    if m < 1:
        raise ValueError("top_m must be >= 1")
    ls = float(logit_scale)
    best_s = np.full((K, m), -np.inf, np.float64)
    best_id = np.full((K, m), -1, np.int64)
    best_e = np.zeros((K, m, D), np.float32)
    if K == 0:
        for _ in _as_batches(segment_batches):
            pass
        out = (np.zeros((0, D), np.float32), best_id, np.zeros((0, m)))
        return out if return_scores else out[:2]
    tnorm = float(np.linalg.norm(T, axis=1).max())
    eps32 = float(np.finfo(np.float32).eps)
    # (D, K) contiguous, the logit scale folded in (one pass less; its rounding is within ``delta`` below)
    TT = np.ascontiguousarray(T.T * np.float32(ls))
    lg_buf = np.empty((0, K), np.float32)  # reused: a fresh (n, K) result each batch costs page faults
    for ids, E in _as_batches(segment_batches, prefetch_batches):
        if len(ids) == 0:
            continue
        E = np.ascontiguousarray(E, dtype=np.float32)
        if E.shape[1] != D:
            raise ValueError(f"segment embeddings have dimension {E.shape[1]}, text embeddings {D}")
        n = len(E)
        # Error of the float32 path against the exact one: a GEMM similarity is off by <= D*eps*|e||t|, a logit
        # by ls times that (``delta`` below covers that, the scaling and the rounding of the exact similarity to
        # float32); a log-probability by about twice that in absolute terms, which is <= 3x that *relative* to
        # |log p| (non-top classes have |log p| >= log 2; the top class's -log1p(rest) carries the relative error
        # of ``rest``). Relative, so that confident classes (log p ~ -1e-20) keep a tight margin.
        enorm = float(np.sqrt(np.einsum("ij,ij->i", E, E).max()))
        delta = abs(ls) * (D + 4) * eps32 * enorm * tnorm
        rel = 8.0 * delta
        full = bool(best_id[:, m - 1].min() >= 0)  # every class holds m segments: its threshold is exact
        if device is None:
            if len(lg_buf) < n:
                lg_buf = np.empty((n, K), np.float32)
            # float32 logits, (n, K): rows contiguous, so the per-segment max / argmax / sum over classes are fast
            lg = np.matmul(E, TT, out=lg_buf[:n])
        urows = _bounded_candidates(lg, best_s[:, m - 1], delta) if bound and device is None and full else None
        if urows is not None:  # only the rows the bound keeps get the softmax test
            lp = _approx_log_probs_(lg[urows])
        else:
            lp = _approx_log_probs_(lg) if device is None else _torch_log_probs(E, T, ls, device)
        thr = best_s[:, m - 1].copy()  # exact m-th best so far; -inf while fewer than m
        notfull = np.flatnonzero(best_id[:, m - 1] < 0)
        if len(notfull):
            # the final m-th best is at least this batch's m-th best (estimated, hence twice the margin)
            if n > m:
                kth = np.partition(np.ascontiguousarray(lp[:, notfull].T), n - m, axis=1)[:, n - m]
                thr[notfull] = kth.astype(np.float64) * (1.0 + rel)
            else:
                thr[notfull] = -np.inf
        thr = thr - rel * np.abs(thr) - 1e-30  # -inf stays -inf
        rr, kk = np.nonzero(lp >= thr.astype(np.float32)[None, :])
        if urows is not None:
            rr = urows[rr]
        if len(rr) == 0:
            continue
        order = np.argsort(kk, kind="stable")
        rr, kk = rr[order], kk[order]
        urows, pos = np.unique(rr, return_inverse=True)
        exact = _canonical_log_probs(E[urows], T, ls)  # (K, c)
        starts = np.searchsorted(kk, np.arange(K + 1))
        for k in np.flatnonzero(np.diff(starts)):
            sl = slice(starts[k], starts[k + 1])
            c_rows, c_pos = rr[sl], pos[sl]
            s_all = np.concatenate([best_s[k], exact[k, c_pos]])
            id_all = np.concatenate([best_id[k], ids[c_rows]])
            order = np.lexsort((np.where(id_all < 0, np.iinfo(np.int64).max, id_all), -s_all))[:m]
            e_all = np.concatenate([best_e[k], E[c_rows]])
            best_s[k], best_id[k], best_e[k] = s_all[order], id_all[order], e_all[order]
    protos, sup, scores = _finish(best_s, best_id, best_e)
    return (protos, sup, scores) if return_scores else (protos, sup)


def brute_force_known_prototypes(segment_batches, text_emb: np.ndarray, logit_scale: float, top_m: int = 32,
                                 *, return_scores: bool = False):
    """Reference for :func:`known_prototypes`: holds every segment, scores them all at once, full sort per class.
    Same inputs and outputs; for tests and small data only."""
    pairs = list(_as_batches(segment_batches))
    T = np.asarray(text_emb, np.float32)
    K, D = T.shape
    m = int(top_m)
    ids = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
    E = np.concatenate([np.asarray(p[1], np.float32) for p in pairs]) if pairs else np.zeros((0, D), np.float32)
    best_s = np.full((K, m), -np.inf)
    best_id = np.full((K, m), -1, np.int64)
    best_e = np.zeros((K, m, D), np.float32)
    if len(ids) and K:
        lp = _canonical_log_probs(E, T, logit_scale)
        for k in range(K):
            order = np.lexsort((ids, -lp[k]))[:m]
            best_s[k, :len(order)], best_id[k, :len(order)], best_e[k, :len(order)] = lp[k, order], ids[order], E[order]
    protos, sup, scores = _finish(best_s, best_id, best_e)
    if K == 0:
        protos, scores = np.zeros((0, D), np.float32), np.zeros((0, m))
    return (protos, sup, scores) if return_scores else (protos, sup)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fixed pseudo-random permutation of ids."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _bottom_k_by_hash(source, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` segments with the smallest ``hash(seed, id)`` keys: ``(keys (k,) uint64, ids (k,), emb (k, D))``
    in increasing key order (fewer when the source has fewer). A uniform sample without replacement, seeded, and
    independent of batch sizes and order."""
    seed_key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    keep_k = np.zeros(0, np.uint64)
    keep_id = np.zeros(0, np.int64)
    keep_e = None
    for ids, E in _as_batches(source):
        if keep_e is None:
            keep_e = np.zeros((0, E.shape[1]), np.float32)
        if k == 0 or len(ids) == 0:
            continue
        keys = _mix64(ids.astype(np.uint64) ^ seed_key)
        if len(ids) > k:
            sel = np.argpartition(keys, k - 1)[:k]
            cand = np.flatnonzero(keys <= keys[sel].max())  # keep key ties at the boundary
            keys, ids_b, E_b = keys[cand], ids[cand], E[cand]
        else:
            ids_b, E_b = ids, E
        k_all = np.concatenate([keep_k, keys])
        i_all = np.concatenate([keep_id, ids_b])
        order = np.lexsort((i_all, k_all))[:k]
        e_all = np.concatenate([keep_e, np.asarray(E_b, np.float32)])
        keep_k, keep_id, keep_e = k_all[order], i_all[order], e_all[order]
    if keep_e is None:
        raise ValueError("unknown_prototypes: the segment source is empty")
    return keep_k, keep_id, keep_e


def unknown_prototypes(sample_source, u: int = 64, seed: int = 0, *, text_emb: np.ndarray | None = None,
                       logit_scale: float = 100.0, pool: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Unknown-class prototypes ``C_u = random(clip-i(Ŝ), u)`` (paper Sec. 3.2, Fig. 3c).

    ``sample_source``: iterable of ``(ids, emb)`` segment batches (or one such pair, or an ``(N, D)`` array).
    Returns ``protos (u, D) float32`` L2-normalised and their segment ``ids (u,) int64`` (fewer when there are
    fewer than ``u`` segments).

    Sampling is a one-pass reservoir of the "bottom-u" kind: every segment gets the key ``hash(seed, id)``
    (splitmix64) and the ``u`` smallest keys are kept. That is a uniform sample without replacement, seeded, and –
    unlike classic reservoir sampling – independent of batch sizes and of the order the batches come in.

    ``pool < 1`` with the known classes' ``text_emb`` ``(K, D)``: unknown classes are what the known ones do not
    explain, so the prototypes are drawn from the ``pool`` fraction of segments least explained by them (lowest
    ``max_k softmax_k(logit_scale · sim(i_s, t_k))``), measured on a uniform sample of ``max(64·u, 4096)``
    segments (same reservoir; exact, batch-independent scores). A random segment of a known class as an unknown
    prototype instead takes over that class's segments in L_s, and where it mixes classes the student reads them
    as the wrong one (docs/results.md, the synthetic sweep). ``pool = 1``: the paper's uniform draw.
    """
    u = int(u)
    if not 0 < pool <= 1:
        raise ValueError(f"pool must be in (0, 1], got {pool}")
    if pool >= 1 or text_emb is None or len(text_emb) == 0 or u == 0:
        _, ids, emb = _bottom_k_by_hash(sample_source, u, seed)
        return _l2n(emb), ids
    n = max(64 * u, 4096)
    keys, ids, emb = _bottom_k_by_hash(sample_source, n, seed)
    best = _canonical_log_probs(emb, np.asarray(text_emb, np.float32), logit_scale).max(axis=0)  # (n,)
    n_pool = max(u, int(np.ceil(pool * len(ids))))
    cand = np.lexsort((ids, best))[:n_pool]  # least explained first (ties: smaller id)
    cand = cand[np.lexsort((ids[cand], keys[cand]))][:u]  # then uniform among them, in key order
    return _l2n(emb[cand]), ids[cand]


# ================================================================================================ the set
@dataclass
class PrototypeSet:
    """The target classes ``C = {C_k, C_u}``: ``L = k + u`` prototypes.

    ``names`` (class names; ``unknown_00``... for unknowns), ``kinds`` (``"known"``/``"unknown"``), ``vectors``
    ``(L, D) float32`` L2-normalised, ``support`` one int64 array of segment ids per prototype (the top-m segments
    of a known class, the sampled segment of an unknown one), ``meta`` free JSON-serialisable metadata.
    """

    names: list[str]
    kinds: list[str]
    vectors: np.ndarray
    support: list[np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vectors = np.asarray(self.vectors, np.float32)
        if not (len(self.names) == len(self.kinds) == len(self.vectors) == len(self.support)):
            raise ValueError("PrototypeSet: names, kinds, vectors and support must have the same length")
        bad = set(self.kinds) - {"known", "unknown"}
        if bad:
            raise ValueError(f"PrototypeSet: kinds must be 'known' or 'unknown', got {sorted(bad)}")

    @classmethod
    def from_parts(cls, class_names, known: np.ndarray, known_support: np.ndarray, unknown: np.ndarray,
                   unknown_ids: np.ndarray, meta: dict | None = None) -> "PrototypeSet":
        """Known prototypes (``(K, D)``, may be ``(0, 0)`` when class-free) + unknown ones (``(u, D)``)."""
        class_names = list(class_names or [])
        known = np.asarray(known, np.float32)
        unknown = np.asarray(unknown, np.float32)
        if len(class_names) != len(known):
            raise ValueError(f"{len(class_names)} class names for {len(known)} known prototypes")
        D = known.shape[1] if len(known) else (unknown.shape[1] if unknown.ndim == 2 else 0)
        known = known.reshape(-1, D) if len(known) else np.zeros((0, D), np.float32)
        unknown = unknown.reshape(-1, D) if len(unknown) else np.zeros((0, D), np.float32)
        ks = np.asarray(known_support, np.int64).reshape(len(known), -1) if len(known) else []
        names = class_names + [f"unknown_{i:02d}" for i in range(len(unknown))]
        kinds = ["known"] * len(known) + ["unknown"] * len(unknown)
        support = [row[row >= 0] for row in ks] + [np.array([i], np.int64) for i in np.asarray(unknown_ids, np.int64)]
        return cls(names, kinds, np.concatenate([known, unknown]), support, dict(meta or {}))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    @property
    def known_mask(self) -> np.ndarray:
        return np.array([k == "known" for k in self.kinds], bool)

    @property
    def n_known(self) -> int:
        return int(self.known_mask.sum())

    @property
    def n_unknown(self) -> int:
        return len(self.kinds) - self.n_known

    def to_table(self):
        """pyarrow Table: ``name`` string, ``kind`` string, ``vector`` fixed_size_list<float32>[D],
        ``support`` list<int64>; schema metadata ``clips4`` = JSON of ``meta`` + dim/counts."""
        import pyarrow as pa

        D = self.dim
        vec = pa.FixedSizeListArray.from_arrays(pa.array(self.vectors.reshape(-1), pa.float32()), D)
        sup = pa.array([np.asarray(s, np.int64).tolist() for s in self.support], pa.list_(pa.int64()))
        meta = {"kind": "prototypes", "dim": D, "n_known": self.n_known, "n_unknown": self.n_unknown, **self.meta}
        return pa.table({"name": pa.array(self.names, pa.string()), "kind": pa.array(self.kinds, pa.string()),
                         "vector": vec, "support": sup}).replace_schema_metadata({"clips4": json.dumps(meta)})

    @classmethod
    def from_table(cls, table) -> "PrototypeSet":
        md = (table.schema.metadata or {}).get(b"clips4")
        meta = json.loads(md) if md else {}
        D = int(meta.get("dim", table.schema.field("vector").type.list_size))
        for k in ("kind", "dim", "n_known", "n_unknown"):
            meta.pop(k, None)
        vec = table.column("vector").combine_chunks()
        vectors = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, D) if D else \
            np.zeros((table.num_rows, 0), np.float32)
        support = [np.asarray(s, np.int64) for s in table.column("support").to_pylist()]
        return cls(table.column("name").to_pylist(), table.column("kind").to_pylist(), vectors, support, meta)

    def save(self, path: str) -> None:
        import pyarrow.parquet as pq

        pq.write_table(self.to_table(), str(path))

    @classmethod
    def load(cls, path: str) -> "PrototypeSet":
        import pyarrow.parquet as pq

        return cls.from_table(pq.read_table(str(path)))
