"""Benchmark: known prototypes over 1,000,000 streamed 512-d segment embeddings, 171 classes, m = 32.

Targets: <= 5 s wall and <= 1.5 GiB peak RSS (``--target-s``, ``--target-gib``). The embeddings are written to a
temporary Parquet file in batches (``row_id`` int64, ``embedding`` raw float32 rows, ``fixed_size_binary(2048)``
uncompressed, as the clip-features stage writes its segments table) and then streamed back with pyarrow, so the
table is never held whole. Three passes over that file, same prototypes: one after the other (decode, then
score: the split of the two), overlapped with every row through the float32 softmax test (``bound=False``, the
search before the two-logit bound), and overlapped with the bound (the default); and the default once more over
the same rows stored as ``fixed_size_list<float32>[512]`` (zstd), as caches written before store them. Reported: wall and CPU seconds of each, the load average, and peak RSS of the process
(ru_maxrss of this process; the file is written by a child process).

    .venv/bin/python benchmarks/prototypes.py [--n 1000000] [--dim 512] [--classes 171] [--m 32]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np


def write_table(path: str, n: int, dim: int, batch: int, seed: int, fmt: str = "binary") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clips4.pipeline.cache import float_rows

    rng = np.random.default_rng(seed)
    # a few cluster centres so that classes have genuinely close segments (closer to real CLIP data than noise)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    emb_type = pa.binary(4 * dim) if fmt == "binary" else pa.list_(pa.float32(), dim)
    schema = pa.schema([("row_id", pa.int64()), ("embedding", emb_type)])
    comp = {"row_id": "zstd", "embedding": "none" if fmt == "binary" else "zstd"}
    with pq.ParquetWriter(path, schema, compression=comp) as w:
        for start in range(0, n, batch):
            m = min(batch, n - start)
            e = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim), dtype=np.float32)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            emb = float_rows(e) if fmt == "binary" else pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), dim)
            w.write_table(pa.table({"row_id": pa.array(np.arange(start, start + m, dtype=np.int64)), "embedding": emb},
                                   schema=schema))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=171)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-s", type=float, default=5.0, help="wall time goal (COCO-Stuff scale, 5M: 45)")
    ap.add_argument("--target-gib", type=float, default=1.5, help="peak RSS goal (COCO-Stuff scale, 5M: 2)")
    ap.add_argument("--check", action="store_true", help="also compare with the brute-force reference (small n)")
    ap.add_argument("--write-only", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--format", default="binary", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.write_only:
        write_table(a.write_only, a.n, a.dim, a.batch, a.seed, a.format)
        return 0

    from clips4.pipeline.prototypes import brute_force_known_prototypes, iter_embedding_batches, known_prototypes

    rng = np.random.default_rng(a.seed + 1)
    text = rng.standard_normal((a.classes, a.dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "segments.parquet")
        t0 = time.perf_counter()
        # written by a child process, so that the peak RSS below is the streaming computation's alone
        import subprocess

        lists = os.path.join(tmp, "segments-list.parquet")
        for p, fmt in ((path, "binary"), (lists, "list")):
            subprocess.run([sys.executable, __file__, "--write-only", p, "--n", str(a.n), "--dim", str(a.dim),
                            "--batch", str(a.batch), "--seed", str(a.seed), "--format", fmt], check=True)
        print(f"wrote {a.n:,} x {a.dim} embeddings ({os.path.getsize(path) / 2**30:.2f} GiB Parquet) "
              f"in {time.perf_counter() - t0:.1f} s")

        read_s = read_cpu = 0.0

        def timed(it):
            nonlocal read_s, read_cpu
            while True:
                t, c = time.perf_counter(), time.process_time()
                try:
                    item = next(it)
                except StopIteration:
                    read_s += time.perf_counter() - t
                    read_cpu += time.process_time() - c
                    return
                read_s += time.perf_counter() - t
                read_cpu += time.process_time() - c
                yield item

        def run(src=path, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = known_prototypes(iter_embedding_batches(src, batch_size=a.batch), text, 100.0, top_m=a.m, **kw)
            return out, time.perf_counter() - t, time.process_time() - c

        # one after the other first (decode, then score: the split of the two), then overlapped: every row through
        # the softmax test, and the default (the two-logit bound first)
        t0, c0 = time.perf_counter(), time.process_time()
        serial = known_prototypes(timed(iter_embedding_batches(path, batch_size=a.batch)), text, 100.0, top_m=a.m,
                                  prefetch_batches=0)
        serial_wall = time.perf_counter() - t0
        compute = serial_wall - read_s
        compute_cpu = time.process_time() - c0 - read_cpu
        (plain_p, plain_s), plain_wall, plain_cpu = run(bound=False)
        (protos, support), wall, cpu = run()
        (list_p, list_s), list_wall, list_cpu = run(lists)
        for p, s in ((serial[0], serial[1]), (plain_p, plain_s), (list_p, list_s)):
            assert np.array_equal(s, support) and np.array_equal(p, protos)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
        print(f"known_prototypes: n={a.n:,} dim={a.dim} classes={a.classes} m={a.m}")
        print(f"  one after the other: compute {compute:.2f} s ({compute_cpu:.2f} s CPU) + {read_s:.2f} s Parquet "
              f"streaming = {serial_wall:.2f} s wall")
        print(f"  overlapped, every row through the softmax test: {plain_wall:.2f} s wall, {plain_cpu:.2f} s CPU")
        print(f"  overlapped, the default (two-logit bound first): {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"({plain_wall / wall:.2f}x wall, {plain_cpu / cpu:.2f}x CPU; {serial_wall / wall:.2f}x one after the "
              f"other; same prototypes in all three)")
        print(f"  the default over fixed_size_list rows (zstd, caches written before): {list_wall:.2f} s wall, "
              f"{list_cpu:.2f} s CPU ({list_wall / wall:.2f}x the raw rows' wall)")
        print(f"  load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"  peak RSS {peak:.2f} GiB")
        print(f"  targets: <= {a.target_s:g} s wall {'OK' if wall <= a.target_s else 'MISSED'}, "
              f"<= {a.target_gib:g} GiB {'OK' if peak <= a.target_gib else 'MISSED'}")
        assert protos.shape == (a.classes, a.dim) and support.shape == (a.classes, a.m)
        if a.check:
            ref_p, ref_s = brute_force_known_prototypes(iter_embedding_batches(path), text, 100.0, top_m=a.m)
            same = np.array_equal(ref_s, support) and np.array_equal(ref_p, protos)
            print(f"  identical to brute force: {same}")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
