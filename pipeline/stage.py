"""Stages: pure functions of (params, inputs) → outputs, fingerprinted, resumable, committed by an index.

A stage's output folder is named by ``fingerprint(stage, code version, params, upstream fingerprints,
dataset)``. Before any work, finished images are read from the folder's completed parts; only the rest is
processed. Each batch becomes one part; when all are done the index is (re)written last.

Per-image change detection: each row stores the input file's ``source_sig`` (size + mtime / ETag). An image
whose file changed is processed again in the same folder; failed images are retried only with
``retry_failed`` or when their file changed, so a cron rerun of an unchanged dataset does nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from rich.console import Console

from clips4.pipeline.cache import INDEX, META, StageReader, StageWriter, url_join
from clips4.pipeline.config import Config, resolved_dict
from clips4.pipeline.datasets import Dataset, open_dataset, source_signature
from clips4.pipeline.runner import run_batches

console = Console(stderr=True)


@dataclass(frozen=True)
class StageSpec:
    """Declaration of a per-image stage. ``version`` is bumped whenever the code changes its outputs."""

    name: str
    version: str
    #: ``module:Class`` of the processor (see notes/CONTRACTS.md); built once per worker
    processor: str
    #: upstream stages (their committed outputs are inputs; their fingerprints enter ours)
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    #: optional ``module:function(params) -> tuple[str, ...]`` when deps depend on params
    dynamic_deps: str | None = None
    #: a whole-dataset stage instead of a per-image one: ``module:function(params, deps: dict[str, url],
    #: out_url: str) -> list[str]`` writes its files under ``out_url`` and returns their names
    builder: str | None = None
    #: optional ``module:function(params) -> dict`` run in the driver before any fan-out: fails fast (missing
    #: weights, bad detector files) and returns facts recorded in meta.json (e.g. resolved weights + sha256)
    preflight: str | None = None


STAGES: dict[str, StageSpec] = {
    # version 2: the default detector is the learned one (a retrained data/contours/edgenet.onnx bumps it again)
    "segments": StageSpec(
        "segments", "2", "clips4.pipeline.processors:SegmentsProcessor", (), ("contours", "ucm", "labels"),
        preflight="clips4.pipeline.processors:segments_preflight",
    ),
    "clip_features": StageSpec(
        "clip_features", "1", "clips4.pipeline.processors:ClipFeaturesProcessor", (), ("features", "segments"),
        dynamic_deps="clips4.pipeline.processors:clip_features_deps",
        preflight="clips4.pipeline.processors:clip_features_preflight",
    ),
    # run by the trainer (clips4 train), declared here for its fingerprint and deps
    "train": StageSpec("train", "1", "", ("segments", "clip_features", "prototypes"), ("checkpoints", "metrics")),
    "prototypes": StageSpec(
        "prototypes", "1", "", ("clip_features",), ("prototypes",),
        builder="clips4.pipeline.processors:build_prototypes",
    ),
}


class StageError(RuntimeError):
    """A stage cannot run (missing upstream output, bad input); the message says what to do."""


def _import(path: str):
    mod, _, name = path.partition(":")
    return getattr(import_module(mod), name)


def code_version() -> str:
    """Git SHA of the checkout when there is one (saved with every output), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        if sha:
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "v" + version("clips4")
    except PackageNotFoundError:
        return "unknown"


def fingerprint(stage: str, version: str, params: dict, deps: dict[str, str], dataset: dict) -> str:
    """16 hex digits of sha256 over everything that determines a stage's output (never the git SHA:
    unrelated commits must not invalidate caches; ``version`` is bumped when outputs change)."""
    payload = json.dumps(
        {"stage": stage, "version": version, "params": params, "deps": deps,
         "dataset": {k: dataset.get(k) for k in ("kind", "root", "split")}},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stage_deps(cfg: Config, name: str) -> tuple[str, ...]:
    spec = STAGES[name]
    if spec.dynamic_deps:
        return tuple(_import(spec.dynamic_deps)(cfg.params(name)))
    return spec.deps


def stage_url(cfg: Config, name: str, dataset: Dataset) -> tuple[str, str, dict[str, str]]:
    """(url, fingerprint, upstream fingerprints) of stage ``name`` for ``dataset`` under ``cfg``."""
    dep_fps: dict[str, str] = {}
    for dep in stage_deps(cfg, name):
        _, fp, _ = stage_url(cfg, dep, dataset)
        dep_fps[dep] = fp
    params = cfg.params(name).model_dump(mode="json")
    fp = fingerprint(name, STAGES[name].version, params, dep_fps, dataset.describe())
    return url_join(cfg.cache_root, dataset.key, name, fp), fp, dep_fps


def open_stage(cfg: Config, name: str, dataset: Dataset) -> StageReader:
    """The committed output of ``name`` for ``dataset``; a clear error says how to make it if missing."""
    url, fp, _ = stage_url(cfg, name, dataset)
    try:
        return StageReader(url)
    except Exception as exc:  # noqa: BLE001
        cmd = name.replace("_", "-")
        raise StageError(
            f"no finished '{name}' output with fingerprint {fp} for dataset {dataset.key} (looked in {url}); "
            f"run `clips4 precompute {cmd}` with the same config first ({exc})"
        ) from None


def dataset_from_config(cfg: Config) -> Dataset:
    if not cfg.dataset.root:
        raise StageError("no dataset root: pass --root (and --dataset KIND) or set dataset.root in the config")
    return open_dataset(cfg.dataset.kind, cfg.dataset.root, cfg.dataset.split, limit=cfg.dataset.limit)


@dataclass
class StageRun:
    stage: str
    url: str
    fingerprint: str
    total: int
    skipped: int
    processed: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return self.processed == 0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("stage", "url", "fingerprint", "total", "skipped", "processed", "failed", "seconds")}


def run_stage(
    cfg: Config,
    name: str,
    *,
    dataset: Dataset | None = None,
    retry_failed: bool = False,
    show_progress: bool = True,
) -> StageRun:
    """Run stage ``name`` over the dataset, skipping finished images, and commit its index."""
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    spec = STAGES[name]
    if not spec.processor and not spec.builder:
        raise StageError(f"stage {name!r} is not run by the pipeline (use `clips4 {name}`)")
    dataset = dataset or dataset_from_config(cfg)
    url, fp, dep_fps = stage_url(cfg, name, dataset)
    deps = {dep: open_stage(cfg, dep, dataset).url for dep in stage_deps(cfg, name)}
    params = cfg.params(name)
    writer = StageWriter(url)
    if spec.builder:
        return _run_global(cfg, spec, dataset, url, fp, dep_fps, deps)
    if not writer.fs.exists(f"{writer.path}/{META}"):
        facts = _import(spec.preflight)(params) if spec.preflight else {}
        writer.write_meta({**_meta(cfg, spec, dataset, fp, dep_fps, deps), "preflight": facts})
    elif spec.preflight:
        _import(spec.preflight)(params)
    t0 = time.perf_counter()
    records = dataset.records()
    sigs = [source_signature(r.path) for r in records]
    finished: dict[str, tuple[str, str]] = {}
    prior = writer.part_rows()
    if prior is not None and prior.num_rows:
        for img, st, sig, part in zip(prior["image_id"].to_pylist(), prior["status"].to_pylist(),
                                      prior["source_sig"].to_pylist(), prior["part"].to_pylist()):
            if img not in finished or part >= finished[img][2]:
                finished[img] = (st, sig, part)
    todo = []
    for rec, sig in zip(records, sigs):
        prev = finished.get(rec.image_id)
        if prev and prev[1] == sig and (prev[0] == "ok" or not retry_failed):
            continue
        todo.append((rec, sig))
    skipped = len(records) - len(todo)
    console.print(f"[bold]{name}[/]: {dataset.key} → {url}")
    console.print(f"  {len(records)} images, {skipped} already done, {len(todo)} to process")
    summaries = []
    if todo:
        factory = functools.partial(_import(spec.processor), params, {"stage_url": url, "deps": deps, "dataset": dataset.describe()})
        summaries = run_batches(
            factory, todo, url, executor=cfg.ray.executor, address=cfg.ray.address, num_workers=cfg.ray.num_workers,
            batch_size=cfg.ray.batch_size, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
            description=name, show_progress=show_progress,
        )
    if todo or not writer.fs.exists(f"{writer.path}/{INDEX}"):
        writer.commit()
    failed = [f for s in summaries for f in s.failed]
    run = StageRun(name, url, fp, len(records), skipped, len(todo), failed, time.perf_counter() - t0)
    return run


def _meta(cfg: Config, spec: StageSpec, dataset: Dataset, fp: str, dep_fps: dict, deps: dict) -> dict:
    return {
        "stage": spec.name, "fingerprint": fp, "version": spec.version,
        "params": cfg.params(spec.name).model_dump(mode="json"),
        "deps": {d: {"fingerprint": dep_fps[d], "url": deps[d]} for d in deps}, "outs": list(spec.outs),
        "dataset": dataset.describe(), "code": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": resolved_dict(cfg),
    }


def _run_global(cfg: Config, spec: StageSpec, dataset: Dataset, url: str, fp: str, dep_fps: dict, deps: dict) -> StageRun:
    """A whole-dataset stage: build everything under the folder, then write the index (one row per output
    file, with its sha256) last. A finished folder is never rebuilt; an unfinished one is rebuilt whole."""
    import hashlib as _h

    import pyarrow as pa

    from clips4.pipeline.cache import write_parquet_atomic

    writer = StageWriter(url)
    console.print(f"[bold]{spec.name}[/]: {dataset.key} → {url}")
    if writer.fs.exists(f"{writer.path}/{INDEX}"):
        console.print("  already finished")
        return StageRun(spec.name, url, fp, 1, 1, 0)
    t0 = time.perf_counter()
    writer.write_meta(_meta(cfg, spec, dataset, fp, dep_fps, deps))
    names = _import(spec.builder)(cfg.params(spec.name), deps, url)
    rows = []
    for n in names:
        with writer.fs.open(f"{writer.path}/{n}", "rb") as f:
            digest = _h.sha256(f.read()).hexdigest()
        rows.append({"image_id": n, "status": "ok", "error": "", "part": "", "sha256": digest})
    write_parquet_atomic(url_join(url, INDEX), pa.Table.from_pylist(rows))
    return StageRun(spec.name, url, fp, 1, 0, 1, [], time.perf_counter() - t0)


def print_summary(run: StageRun, max_failures: int = 0) -> int:
    """Print the final summary; return the exit code (1 when failures exceed ``max_failures``, -1 = no limit)."""
    if run.nothing_to_do:
        console.print(f"[green]nothing left to do[/]: all {run.total} images of '{run.stage}' are finished")
    elif STAGES[run.stage].builder:
        console.print(f"[bold]{run.stage}[/]: built in {run.seconds:.1f} s")
    else:
        ok = run.processed - len(run.failed)
        rate = run.processed / max(run.seconds, 1e-9)
        console.print(f"[bold]{run.stage}[/]: processed {run.processed} ({ok} ok, {len(run.failed)} failed), "
                      f"skipped {run.skipped}, {run.seconds:.1f} s, {rate:.2f} img/s")
    for img, err in run.failed[:20]:
        console.print(f"  [red]failed[/] {img}: {err}")
    if len(run.failed) > 20:
        console.print(f"  … and {len(run.failed) - 20} more (see errors.parquet)")
    console.print(f"outputs: {run.url}")
    if max_failures >= 0 and len(run.failed) > max_failures:
        console.print(f"[red]{len(run.failed)} image(s) failed (allowed: {max_failures}); exit status 1[/]")
        return 1
    return 0
