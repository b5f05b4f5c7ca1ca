"""Fan-out of per-image work: a pool of Ray actors (or this process), one cache part per batch.

Each actor builds its processor once (a model is loaded once per actor), takes batches of ``ImageRecord``s,
and writes the batch's arrays/tables/rows straight into the stage folder, so only small summaries travel
back to the driver. ``ray.init(address=...)`` is the only thing that differs between a laptop
(``address=local``) and a cluster (``address=auto`` or ``ray://head:10001``).
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from clips4.pipeline.console import make_console
from clips4.pipeline.cache import ItemResult, StageWriter, UndeclaredOutputError, new_part_id
from clips4.pipeline.datasets import ImageRecord

log = logging.getLogger(__name__)
console = make_console(stderr=True)


@dataclass
class BatchSummary:
    part: str
    ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _limit_threads(num_cpus: float) -> None:
    """One actor per core: keep OpenCV/BLAS/torch from oversubscribing the machine."""
    n = max(1, int(num_cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def process_batch(processor: Callable, records: list[ImageRecord], sigs: list[str], stage_url: str) -> BatchSummary:
    """Run ``processor`` on ``records`` and write one part. Per-image failures are rows, never crashes."""
    part = new_part_id()
    t0 = time.perf_counter()
    try:
        results = list(processor(records))
        if len(results) != len(records):
            raise RuntimeError(f"processor returned {len(results)} results for {len(records)} images")
    except UndeclaredOutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a whole-batch failure still becomes per-image rows
        msg = f"{type(exc).__name__}: {exc}"
        log.debug("batch failed: %s", traceback.format_exc())
        results = [ItemResult.failed(msg) for _ in records]
    elapsed = time.perf_counter() - t0
    rows, summary = [], BatchSummary(part=part, seconds=elapsed)
    for rec, sig, res in zip(records, sigs, results):
        if isinstance(res, BaseException):
            res = ItemResult.failed(f"{type(res).__name__}: {res}")
        row = {
            **rec.to_dict(),
            "source_sig": sig,
            "status": "failed" if res.error else "ok",
            "error": res.error or "",
            "part": part,
            "seconds": float(res.row.pop("seconds", elapsed / max(1, len(records)))),
        }
        if res.error:
            res.arrays, res.tables = {}, {}
            summary.failed.append((rec.image_id, res.error))
        else:
            row.update(res.row)
            summary.ok += 1
        rows.append(row)
    StageWriter(stage_url).write_part(part, rows, results)
    return summary


class WorkerStartError(RuntimeError):
    """The per-worker processor could not be built; nothing was processed."""


class _AlwaysFail:
    def __init__(self, msg: str):
        self.msg = msg

    def __call__(self, records):
        return [ItemResult.failed(self.msg) for _ in records]


class _Worker:
    """Body of a Ray actor: builds the processor once, then serves batches."""

    def __init__(self, factory: Callable[[], Callable], num_cpus: float, stage_url: str):
        _limit_threads(num_cpus)
        self.processor = factory()
        self.stage_url = stage_url

    def ready(self) -> bool:
        return True

    def run(self, records: list[ImageRecord], sigs: list[str]) -> BatchSummary:
        return process_batch(self.processor, records, sigs, self.stage_url)


def init_ray(address: str = "local", num_cpus: int | None = None) -> None:
    """Start or join Ray. ``local`` starts a private instance; anything else is passed to ``ray.init``."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if address in ("local", "", None):
        ray.init(num_cpus=num_cpus, **kwargs)
    else:
        ray.init(address=address, **kwargs)


def run_batches(
    factory: Callable[[], Callable],
    work: list[tuple[ImageRecord, str]],
    stage_url: str,
    *,
    executor: str = "ray",
    address: str = "local",
    num_workers: int = 2,
    batch_size: int = 8,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    description: str = "images",
    show_progress: bool = True,
) -> list[BatchSummary]:
    """Process ``work`` ((record, source signature) pairs) in batches; returns one summary per batch."""
    batches = [work[i : i + batch_size] for i in range(0, len(work), batch_size)]
    summaries: list[BatchSummary] = []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress,
        transient=False,
    )
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task(description, total=len(work), rate="-", failed=0)

        def done(s: BatchSummary) -> None:
            summaries.append(s)
            n = sum(x.ok + len(x.failed) for x in summaries)
            rate = n / max(1e-9, time.perf_counter() - t0)
            progress.update(task, advance=s.ok + len(s.failed), rate=f"{rate:.2f}",
                            failed=sum(len(x.failed) for x in summaries))

        if executor == "local" or not batches:
            _limit_threads(num_cpus)
            processor = factory() if batches else None
            for b in batches:
                done(process_batch(processor, [r for r, _ in b], [s for _, s in b], stage_url))
            return summaries

        import ray

        init_ray(address, num_cpus=None)
        n_workers = max(1, min(num_workers, len(batches)))
        Actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_Worker)
        actors = [Actor.remote(factory, num_cpus, stage_url) for _ in range(n_workers)]
        try:
            # a processor that cannot be built (missing weights, bad detector params) stops the run with its own
            # message instead of turning every image into a failed row
            try:
                ray.get([a.ready.remote() for a in actors])
            except Exception as exc:  # noqa: BLE001
                cause = getattr(exc, "cause", None) or exc
                raise WorkerStartError(f"{description} workers could not start: {cause}") from None
            pending: dict[Any, tuple[int, list]] = {}
            queue = list(range(len(batches)))
            free = list(range(n_workers))
            while queue or pending:
                while queue and free:
                    w = free.pop()
                    b = batches[queue.pop(0)]
                    pending[actors[w].run.remote([r for r, _ in b], [s for _, s in b])] = (w, b)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    w, b = pending.pop(ref)
                    try:
                        done(ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - a dead worker (OOM, segfault) fails its batch only
                        msg = f"worker crashed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        done(process_batch(_AlwaysFail(msg), [r for r, _ in b], [s for _, s in b], stage_url))
                        ray.kill(actors[w])
                        actors[w] = Actor.remote(factory, num_cpus, stage_url)
                    free.append(w)
        finally:
            for a in actors:
                ray.kill(a)
    return summaries
