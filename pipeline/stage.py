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
import inspect
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from clips4.pipeline.cache import (INDEX, META, StageReader, StageWriter, UndeclaredOutputError, commit_files,
                                   quarantine_damaged, url_join, verify_stage)
from clips4.pipeline.names import display, from_stored
from clips4.pipeline.config import (Config, current_backend_spec, fingerprinted_backend_spec, flat_params, resolved_dict,
                                    stage_object)
from clips4.pipeline.datasets import Dataset, open_dataset, source_signature
from clips4.pipeline.failures import StageInterrupted, _Signalled, signal_name, signals_as_exceptions
from clips4.pipeline.lock import StageLock, StageLocked  # noqa: F401 - StageLocked is part of this API
from clips4.pipeline.console import make_console
from clips4.pipeline.runner import RunFailed, resolve_executor, run_batches  # noqa: F401 - RunFailed is part of this API

console = make_console(stderr=True)


class StageError(RuntimeError):
    """A stage cannot run (missing upstream output, bad input); the message says what to do."""


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


def fingerprint(stage: str, version: str, params: dict, deps: dict[str, str], dataset: dict,
                inputs: dict[str, str] | None = None) -> str:
    """16 hex digits of sha256 over everything that determines a stage's output (never the git SHA:
    unrelated commits must not invalidate caches; ``version`` is bumped when outputs change).

    ``inputs`` (whole-dataset stages only): digests of what each upstream holds for the selected images
    (:func:`input_rows`), so a new, removed or changed image makes the output another one. Per-image stages
    leave it out: their folder is reused across image lists, and each image is computed once."""
    payload = {"stage": stage, "version": version, "params": params, "deps": deps,
               "dataset": {k: dataset.get(k) for k in ("kind", "root", "split")}}
    if inputs is not None:
        payload["inputs"] = inputs
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_def(cfg: Config, name: str):
    """The code object stages.yaml names for ``name`` (see :func:`clips4.pipeline.config.stage_object`)."""
    return stage_object(cfg.decl(name).run)


class _CheckedProcessor:
    """A processor whose results may only write the outputs stages.yaml declares for its stage."""

    def __init__(self, cls, outs: tuple[str, ...], stage: str, params, ctx: dict):
        self.inner = cls(params, ctx)
        self.outs, self.stage = set(outs), stage

    def __call__(self, records):
        results = self.inner(records)
        for r in results:
            extra = (set(getattr(r, "arrays", None) or {}) | set(getattr(r, "tables", None) or {})) - self.outs
            if extra:
                raise UndeclaredOutputError(f"stage {self.stage!r} wrote {sorted(extra)}, which its outs in "
                                            f"stages.yaml ({sorted(self.outs)}) do not declare")
        return results


def stage_url(cfg: Config, name: str, dataset: Dataset) -> tuple[str, str, dict[str, str]]:
    """(url, fingerprint, upstream fingerprints) of stage ``name`` for ``dataset`` under ``cfg``."""
    dep_fps: dict[str, str] = {}
    for dep in cfg.stage_deps(name):
        _, fp, _ = stage_url(cfg, dep, dataset)
        dep_fps[dep] = fp
    params = identity_params(cfg, name)
    inputs = None if stage_def(cfg, name).kind == "per_image" else input_digests(cfg, name, dataset)
    fp = fingerprint(name, str(stage_def(cfg, name).version), params, dep_fps, dataset.describe(), inputs)
    return url_join(cfg.cache_root, dataset.key, name, fp), fp, dep_fps


def identity_params(cfg: Config, name: str) -> dict:
    """The params that identify a stage's output: all of them, with the keys its stage object declares
    ``operational`` (how a run is carried out, not what it computes; e.g. train's iterations) at their defaults, and a
    moved backend under the spelling it was first fingerprinted with."""
    obj = stage_def(cfg, name)
    params = cfg.params(name).model_dump(mode="json")
    op = getattr(obj, "operational", ())
    if op:
        defaults = obj.Params().model_dump(mode="json")
        params.update({k: defaults[k] for k in op if k in defaults})
    clip = params.get("clip")
    if isinstance(clip, dict) and "backend" in clip:
        # a moved backend is hashed under its old spelling, so the move leaves existing outputs' fingerprints as
        # they were (see fingerprinted_backend_spec)
        params["clip"] = {**clip, "backend": fingerprinted_backend_spec(clip["backend"])}
    return params


#: what a whole-dataset stage's identity knows of one image of an upstream: (image id, source signature, status)
InputRow = tuple[str, str, str]


def selected_ids(dataset: Dataset) -> list[str]:
    """The image ids the config selects (split lists and ``dataset.limit`` applied), sorted."""
    return [r.image_id for r in dataset.records()]


def input_rows(cfg: Config, name: str, dataset: Dataset) -> dict[str, list[InputRow]]:
    """For a whole-dataset stage: per per-image upstream, what its index holds for each selected image —
    ``(id, source signature, status)``, status ``absent`` where the upstream has no row for it (not run yet).
    This is the content a whole-dataset stage is built from; its digest is part of the stage's fingerprint."""
    from clips4.pipeline.cache import read_parquet

    ids = selected_ids(dataset)
    out: dict[str, list[InputRow]] = {}
    for dep in cfg.stage_deps(name):
        if stage_def(cfg, dep).kind != "per_image":
            continue  # a whole-dataset upstream's own fingerprint already digests its inputs
        url, _, _ = stage_url(cfg, dep, dataset)
        held: dict[str, tuple[str, str]] = {}
        try:
            t = read_parquet(url_join(url, INDEX), columns=["image_id", "source_sig", "status"])
            held = {i: (sig or "", st or "") for i, sig, st in zip(t["image_id"].to_pylist(), t["source_sig"].to_pylist(),
                                                                 t["status"].to_pylist())}
        except Exception:  # noqa: BLE001 - no (readable) index: every image is absent, and the stage is not runnable
            pass
        out[dep] = [(i, *held.get(i, ("", "absent"))) for i in ids]
    return out


def _digest(rows: list[InputRow]) -> str:
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]


def input_digests(cfg: Config, name: str, dataset: Dataset,
                  rows: dict[str, list[InputRow]] | None = None) -> dict[str, str]:
    """``{"images": digest of the selected ids, <upstream>: digest of its rows}`` (see :func:`input_rows`; ``rows``:
    what it returned, when the caller has it already)."""
    rows = input_rows(cfg, name, dataset) if rows is None else rows
    return {"images": _digest([(i, "", "") for i in selected_ids(dataset)]), **{d: _digest(r) for d, r in rows.items()}}


def open_stage(cfg: Config, name: str, dataset: Dataset) -> StageReader:
    """The committed output of ``name`` for ``dataset``; a clear error says how to make it if missing (and names
    the finished outputs of the same stage that differ, with the keys they differ in)."""
    url, fp, _ = stage_url(cfg, name, dataset)
    try:
        reader = StageReader(url)
    except Exception:  # noqa: BLE001
        cmd = "train" if name == "train" else "precompute " + name.replace("_", "-")
        near = neighbours(cfg, name, dataset)
        hint = ""
        if near:
            other, diff = near[0]
            params_differ = any(d.startswith(f"{name}.") for d in diff)
            hint = (f"; a finished one differs in {'; '.join(diff[:6])}" + (" …" if len(diff) > 6 else "")
                    + f" ({other})" + (": set the same in clips4.yaml or pass the same options" if params_differ
                                        else ": its inputs changed since (`clips4 status` says how)"))
        raise StageError(
            f"no finished '{name}' output for this configuration (fingerprint {fp}, dataset {dataset.key}, looked in "
            f"{url}){hint}; run `clips4 {cmd}` or `clips4 repro` with the same configuration first"
        ) from None
    if stage_def(cfg, name).kind != "per_image":
        return reader
    return reader.restrict(selected_ids(dataset))


def param_diff(stage: str, there: dict, here: dict) -> list[str]:
    """``['clip_features.clip.pretrained: "local-dir:X" there, "openai" here', ...]`` between two params dicts."""
    a, b = flat_params(there), flat_params(here)
    for d in (a, b):  # a moved backend's two spellings (meta.json from before the move, identity params) are one
        if "clip.backend" in d:
            d["clip.backend"] = current_backend_spec(d["clip.backend"])
    return [f"{stage}.{k}: {json.dumps(a.get(k), default=str)} there, {json.dumps(b.get(k), default=str)} here"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def finished_outputs(cfg: Config, name: str, dataset: Dataset) -> list[dict]:
    """meta.json (plus ``url``) of every committed output of stage ``name`` for ``dataset``, newest first."""
    from clips4.pipeline.cache import _fs

    fs, root = _fs(url_join(cfg.cache_root, dataset.key, name))
    out = []
    try:
        metas = fs.glob(f"{root}/*/{META}")
    except (OSError, FileNotFoundError):
        return out
    for m in metas:
        d = m.rsplit("/", 1)[0]
        try:
            if not fs.exists(f"{d}/{INDEX}"):
                continue
            with fs.open(m, "r") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        meta["url"] = url_join(cfg.cache_root, dataset.key, name, d.rsplit("/", 1)[-1])
        out.append(meta)
    return sorted(out, key=lambda m: str(m.get("created", "")), reverse=True)


def neighbours(cfg: Config, name: str, dataset: Dataset) -> list[tuple[str, list[str]]]:
    """Finished outputs of ``name`` for ``dataset`` and what differs from this configuration (params first, then
    the upstream outputs and the images they were built from), closest first."""
    here = cfg.params(name).model_dump(mode="json")
    mine = {}
    for dep in cfg.stage_deps(name):
        try:
            mine[dep] = stage_url(cfg, dep, dataset)[1]
        except Exception:  # noqa: BLE001 - an upstream that cannot be named is simply different
            mine[dep] = "?"
    found = []
    for meta in finished_outputs(cfg, name, dataset):
        diff = param_diff(name, meta.get("params") or {}, here)
        if not diff:
            theirs = {d: (v.get("fingerprint") if isinstance(v, dict) else str(v).rstrip("/").rsplit("/", 1)[-1])
                      for d, v in (meta.get("deps") or {}).items()}
            diff = [f"input {d}: output {theirs.get(d)} there, {mine[d]} here" for d in sorted(mine) if theirs.get(d) != mine[d]]
        if not diff and meta.get("inputs") is not None:
            diff = ["the images it was built from (added, removed or changed images)"]
        found.append((meta["url"], diff or [f"code version {meta.get('version')}"]))
    return sorted(found, key=lambda t: len(t[1]))


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
    #: images that had failed in an earlier run and were not retried (still failed in the cache)
    failed_before: list[tuple[str, str]] = field(default_factory=list)
    #: items done per node (``host`` or ``host/<ray node id>``)
    per_node: dict[str, int] = field(default_factory=dict)
    #: corrupt part files moved to ``quarantine/`` (their images were computed again): (file, reason)
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    #: fan-out facts: most batches in flight at once, batches retried after infrastructure errors
    max_in_flight: int = 0
    retries: int = 0
    #: largest batch result that travelled back to the driver (bytes): summaries only, never image data
    max_result_bytes: int = 0
    #: a whole-dataset stage (counts are outputs, not images)
    builder: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return self.processed == 0

    @property
    def all_failed(self) -> list[tuple[str, str]]:
        """Every image of the dataset that is failed in the cache now (this run's and earlier runs')."""
        return self.failed + self.failed_before

    def to_dict(self) -> dict:
        keys = ("stage", "url", "fingerprint", "total", "skipped", "processed", "failed", "failed_before", "seconds",
                "per_node", "quarantined", "max_in_flight", "retries", "max_result_bytes")
        return {k: getattr(self, k) for k in keys}


def run_stage(
    cfg: Config,
    name: str,
    *,
    dataset: Dataset | None = None,
    retry_failed: bool = False,
    show_progress: bool = True,
    wait: bool = False,
    wait_timeout: float | None = None,
) -> StageRun:
    """Run stage ``name`` over the dataset, skipping finished images, and commit its index.

    One run at a time per stage output: another run holding it raises :class:`StageLocked` (exit 3), or with
    ``wait`` is waited for (at most ``wait_timeout`` seconds; None = no limit). SIGTERM/SIGINT raise
    :class:`StageInterrupted` (exit 143/130) after the finished parts are on disk; infrastructure failures that
    outlast the retries raise :class:`RunFailed` (exit 1). Neither writes the index.
    """
    if name not in cfg.stages:
        raise StageError(f"unknown stage {name!r}; stages in the configuration: {', '.join(cfg.stages)}")
    spec = stage_def(cfg, name)
    if spec.kind == "external":
        raise StageError(f"stage {name!r} is not run by the pipeline (use `clips4 {name}`)")
    dataset = dataset or dataset_from_config(cfg)
    url, fp, dep_fps = stage_url(cfg, name, dataset)
    deps = {dep: open_stage(cfg, dep, dataset).url for dep in cfg.stage_deps(name)}
    try:
        with signals_as_exceptions(), StageLock(url, wait=wait, timeout=wait_timeout) as lock:
            if spec.kind == "builder":
                return _run_global(cfg, name, dataset, url, fp, dep_fps, deps)
            return _run_per_image(cfg, name, dataset, url, fp, dep_fps, deps, retry_failed, show_progress, lock.exclusive)
    except _Signalled as sig:
        raise StageInterrupted(
            sig.signum, f"{name}: interrupted by {signal_name(sig.signum)}; finished parts in {url} are kept and a "
            "rerun continues from them (the index was not written)",
        ) from None


def _run_per_image(cfg: Config, name: str, dataset: Dataset, url: str, fp: str, dep_fps: dict, deps: dict,
                   retry_failed: bool, show_progress: bool, exclusive: bool) -> StageRun:
    spec = stage_def(cfg, name)
    params = cfg.params(name)
    writer = StageWriter(url)
    preflight = getattr(spec, "preflight", None)
    if not writer.fs.exists(f"{writer.path}/{META}"):
        facts = preflight(params) if preflight else {}
        writer.write_meta({**_meta(cfg, name, dataset, fp, dep_fps, deps), "preflight": facts})
    elif preflight:
        preflight(params)
    t0 = time.perf_counter()
    records = dataset.records()
    sigs = [source_signature(r.path) for r in records]
    finished: dict[str, tuple[str, str, str, str]] = {}
    # a finished part whose files are missing or truncated is not finished: moved aside, its images computed again
    writer.quarantined += quarantine_damaged(url, verify_stage(url))
    prior = writer.part_rows(quarantine=True, incremental=True)
    for f, reason in writer.quarantined:
        console.print(f"  [yellow]corrupt part moved aside[/] {_esc(f)} ({_esc(reason)}); its images are computed again")
    if prior is not None and prior.num_rows:
        errors = prior["error"].to_pylist() if "error" in prior.column_names else [""] * prior.num_rows
        for img, st, sig, part, err in zip(map(from_stored, prior["image_id"].to_pylist()), prior["status"].to_pylist(),
                                           prior["source_sig"].to_pylist(), prior["part"].to_pylist(), errors):
            if img not in finished or part >= finished[img][2]:
                finished[img] = (st, sig, part, err or "")
    todo, failed_before = [], []
    for rec, sig in zip(records, sigs):
        prev = finished.get(rec.image_id)
        if prev and prev[1] == sig and (prev[0] == "ok" or not retry_failed):
            if prev[0] != "ok":
                failed_before.append((rec.image_id, prev[3]))
            continue
        todo.append((rec, sig))
    skipped = len(records) - len(todo)
    console.print(f"[bold]{name}[/]: {dataset.key} → {url}")
    console.print(f"  {len(records)} images, {skipped} already done"
                  + (f" ({len(failed_before)} of them failed)" if failed_before else "") + f", {len(todo)} to process")
    summaries, stats = [], {}
    if todo:
        executor = resolve_executor(cfg.ray.executor, cfg.ray.address, cfg.ray.num_workers, len(todo), cfg.ray.local_below)
        if cfg.ray.executor == "auto":
            console.print(f"  executor auto: {'in this process' if executor == 'local' else f'Ray, {cfg.ray.num_workers} workers'}"
                          f" ({len(todo)} images; ray.local_below {cfg.ray.local_below}, ray.num_workers "
                          f"{cfg.ray.num_workers})", markup=False)
        factory = functools.partial(_CheckedProcessor, spec, tuple(cfg.decl(name).outs), name, params,
                                    {"stage_url": url, "deps": deps, "dataset": dataset.describe(),
                                     "memory_budget_mb": cfg.ray.memory_budget_mb,
                                     "num_workers": 1 if executor == "local" else cfg.ray.num_workers})
        summaries = run_batches(
            factory, todo, url, executor=executor, address=cfg.ray.address, num_workers=cfg.ray.num_workers,
            batch_size=cfg.ray.batch_size, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
            description=name, show_progress=show_progress, stats=stats,
            **{k: v for k, v in cfg.ray.model_dump().items() if k in _RUNNER_KNOBS},
        )
    if todo or writer.quarantined or not writer.fs.exists(f"{writer.path}/{INDEX}"):
        writer.commit(exclusive=exclusive)
    failed = [f for s in summaries for f in s.failed]
    run = StageRun(name, url, fp, len(records), skipped, len(todo), failed, time.perf_counter() - t0,
                   failed_before=failed_before, per_node=stats.get("per_node", {}), quarantined=writer.quarantined,
                   max_in_flight=stats.get("max_in_flight", 0), retries=stats.get("retries", 0),
                   max_result_bytes=stats.get("max_result_bytes", 0))
    return run


#: RayConfig fields that are passed to the runner as they are (where the config has them)
_RUNNER_KNOBS = ("max_attempts", "backoff_s", "in_flight_per_worker", "connect_timeout_s", "progress_every_s",
                 "temp_dir")


def _meta(cfg: Config, name: str, dataset: Dataset, fp: str, dep_fps: dict, deps: dict) -> dict:
    return {
        "stage": name, "fingerprint": fp, "version": str(stage_def(cfg, name).version), "run": cfg.decl(name).run,
        "params": cfg.params(name).model_dump(mode="json"),
        "deps": {d: {"fingerprint": dep_fps[d], "url": deps[d]} for d in deps}, "outs": list(cfg.decl(name).outs),
        "dataset": dataset.describe(), "code": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": resolved_dict(cfg),
    }


def _run_global(cfg: Config, name: str, dataset: Dataset, url: str, fp: str, dep_fps: dict, deps: dict) -> StageRun:
    """A whole-dataset stage: build everything under the folder, then write the index (one row per output
    file, with its sha256) last. Its fingerprint digests what the upstream holds for the selected images, so a
    finished folder is exactly this input and is never rebuilt; an unfinished one is rebuilt whole."""
    writer = StageWriter(url)
    console.print(f"[bold]{name}[/]: {dataset.key} → {url}")
    damaged = verify_stage(url, checksums=True)  # a few small files: hashed every time
    if writer.fs.exists(f"{writer.path}/{INDEX}") and not damaged:
        console.print("  already finished for these params and these inputs")
        return StageRun(name, url, fp, 1, 1, 0, builder=True)
    for f, reason in quarantine_damaged(url, damaged):
        console.print(f"  [yellow]damaged output moved aside[/] {_esc(f)} ({_esc(reason)}); built again")
    t0 = time.perf_counter()
    rows, ids = input_rows(cfg, name, dataset), selected_ids(dataset)
    writer.write_meta({**_meta(cfg, name, dataset, fp, dep_fps, deps), "inputs": input_digests(cfg, name, dataset, rows),
                       "n_images": len(ids)})
    write_input_rows(url, rows)
    build = stage_def(cfg, name).build
    try:
        takes_ids = "image_ids" in inspect.signature(build).parameters
    except (TypeError, ValueError):
        takes_ids = False
    names = build(cfg.params(name), deps, url, image_ids=ids) if takes_ids else build(cfg.params(name), deps, url)
    outs = cfg.decl(name).outs
    if set(names) - set(outs):
        raise UndeclaredOutputError(f"stage {name!r} wrote {sorted(set(names) - set(outs))}, which its outs in stages.yaml "
                         f"({sorted(outs)}) do not declare")
    commit_files(url, names)
    return StageRun(name, url, fp, 1, 0, 1, [], time.perf_counter() - t0, builder=True)


#: beside meta.json of a whole-dataset output: the upstream rows it was built from (``clips4 status`` compares them)
INPUTS = "inputs.parquet"


def write_input_rows(url: str, rows: dict[str, list[InputRow]]) -> None:
    """``inputs.parquet``: one row per (upstream, image) a whole-dataset output was built from."""
    import pyarrow as pa

    from clips4.pipeline.cache import write_parquet_atomic

    flat = [(d, *r) for d, rs in rows.items() for r in rs]
    t = pa.table({"dep": [f[0] for f in flat], "image_id": [f[1] for f in flat], "source_sig": [f[2] for f in flat],
                  "status": [f[3] for f in flat]}, schema=pa.schema([(c, pa.string()) for c in
                                                                  ("dep", "image_id", "source_sig", "status")]))
    write_parquet_atomic(url_join(url, INPUTS), t)


def read_input_rows(url: str) -> dict[str, list[InputRow]] | None:
    """What :func:`write_input_rows` wrote, or None (an output from before it was recorded)."""
    from clips4.pipeline.cache import read_parquet

    try:
        t = read_parquet(url_join(url, INPUTS))
    except Exception:  # noqa: BLE001
        return None
    out: dict[str, list[InputRow]] = {}
    for d, i, sig, st in zip(*(t[c].to_pylist() for c in ("dep", "image_id", "source_sig", "status"))):
        out.setdefault(d, []).append((i, sig, st))
    return out


def describe_input_change(before: dict[str, list[InputRow]] | None, now: dict[str, list[InputRow]]) -> list[str]:
    """``['clip_features: 4 images added', ...]``: how the inputs of a whole-dataset output changed."""
    if before is None:
        return ["built from other inputs (not recorded in detail)"]
    out = []
    for dep in sorted(set(before) | set(now)):
        a = {r[0]: r[1:] for r in before.get(dep, [])}
        b = {r[0]: r[1:] for r in now.get(dep, [])}
        added = [i for i in b if i not in a]
        removed = [i for i in a if i not in b]
        changed = [i for i in b if i in a and a[i] != b[i]]
        bits = [f"{len(x)} image{'s' if len(x) != 1 else ''} {what}" + (f" ({', '.join(x[:3])}{', …' if len(x) > 3 else ''})")
                for x, what in ((added, "added"), (removed, "removed"), (changed, "changed or recomputed")) if x]
        if bits:
            out.append(f"{dep}: " + ", ".join(bits))
    return out


def _esc(text) -> str:
    """An id, path or reason as one printable line, safe inside Rich markup."""
    from rich.markup import escape

    return escape(display(text))


def print_summary(run: StageRun, max_failures: int = 0) -> int:
    """Print the final summary; return the exit code: 1 when the images failed in the cache (this run's and
    earlier runs' not retried) exceed ``max_failures`` (-1 = no limit), else 0."""
    all_failed = run.all_failed
    if run.nothing_to_do:
        if run.failed_before:
            console.print(f"nothing left to do: all {run.total} images of '{run.stage}' were processed before; "
                          f"{len(run.failed_before)} of them failed (--retry-failed processes them again)")
        else:
            console.print(f"[green]nothing left to do[/]: all {run.total} images of '{run.stage}' are finished")
    elif run.builder:
        console.print(f"[bold]{run.stage}[/]: built in {run.seconds:.1f} s")
    else:
        ok = run.processed - len(run.failed)
        rate = run.processed / max(run.seconds, 1e-9)
        before = f", {len(run.failed_before)} failed in earlier runs" if run.failed_before else ""
        console.print(f"[bold]{run.stage}[/]: processed {run.processed} ({ok} ok, {len(run.failed)} failed), "
                      f"skipped {run.skipped}{before}, {run.seconds:.1f} s, {rate:.2f} img/s")
    if len(run.per_node) > 1 or (run.per_node and "/" in next(iter(run.per_node))):
        console.print("  per node: " + ", ".join(f"{n}: {c}" for n, c in sorted(run.per_node.items()))
                      + (f" (at most {run.max_result_bytes} bytes per batch came back to the driver; "
                         f"at most {run.max_in_flight} batches in flight)" if run.max_result_bytes else ""))
    if run.retries:
        console.print(f"  {run.retries} batch(es) retried after infrastructure errors")
    for img, err in all_failed[:20]:
        console.print(f"  [red]failed[/] {_esc(img)}: {_esc(err)}")
    if len(all_failed) > 20:
        console.print(f"  … and {len(all_failed) - 20} more (see errors.parquet)")
    console.print(f"outputs: {run.url}")
    if max_failures >= 0 and len(all_failed) > max_failures:
        console.print(f"[red]{len(all_failed)} image(s) failed (allowed: {max_failures}); exit status 1[/]")
        return 1
    return 0
