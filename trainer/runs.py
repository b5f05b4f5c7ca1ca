"""What identifies a training run, where it lives and how a finished one is committed and published.

A run's folder is ``<cache_root>/<dataset key>/train/<fingerprint>`` (or a fixed ``train.out``); its fingerprint
digests the train params (the :data:`~clips4.trainer.config.OPERATIONAL` keys left out), the upstream outputs and
what they hold for the selected images. A finished run is committed by ``index.parquet`` (written last) and
published as ``<runs_root>/<train.name>/``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from clips4.pipeline.config import Config
from clips4.pipeline.console import make_console
from clips4.pipeline.datasets import Dataset
from clips4.pipeline.stage import (code_version, describe_input_change, input_digests, input_rows, read_input_rows,
                                   selected_ids, stage_url, write_input_rows)
from clips4.trainer.checkpoint import load_checkpoint
from clips4.trainer.config import OPERATIONAL, TrainParams

console = make_console(stderr=True)


class TrainingError(RuntimeError):
    """Training cannot start as asked (refused checkpoint, an existing run, bad inputs); the message says why."""

    exit_code = 2


class TrainingDiverged(TrainingError):
    """The loss stopped being finite: the run failed (the last good checkpoint is kept)."""

    exit_code = 1


def run_folder(cfg: Config, dataset: Dataset) -> tuple[Path, str]:
    """(output folder, fingerprint) of the run ``cfg`` defines: ``train.out``, else the cache folder named by the
    fingerprint (the :data:`OPERATIONAL` keys left out, so a run can be lengthened or resumed with fewer workers)."""
    p: TrainParams = cfg.params("train")  # type: ignore[assignment]
    url, fp, _ = stage_url(run_identity(cfg), "train", dataset)
    out = Path(p.out) if p.out else Path(url)
    if "://" in str(out) and not str(out).startswith("file://"):
        raise TrainingError(f"training output {out} must be a local folder (set train.out)")
    return out, fp


def run_identity(cfg: Config) -> Config:
    """``cfg`` without the train keys in :data:`OPERATIONAL` (``iterations``, ``num_workers``, ...): they are not
    part of what identifies a run (its fingerprint, folder and checkpoint compatibility), so ``--resume`` can
    lengthen or shorten it, or continue a run killed for its loader's memory with fewer workers. Left at their
    defaults they change nothing, so the fingerprints of such runs are the ones they always had."""
    decl = cfg.stages.get("train")
    if decl is None or not set(decl.params) & set(OPERATIONAL):
        return cfg
    c = cfg.model_copy(deep=True)
    c.stages["train"].params = {k: v for k, v in decl.params.items() if k not in OPERATIONAL}
    return c


def run_meta(out: Path) -> dict | None:
    """meta.json of the finished run in ``out`` (written with ``final.pt``); None for older runs without one."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def finished_step(out: Path, meta: dict | None) -> int:
    """Step of ``final.pt``, from its meta.json or, for older runs, the checkpoint itself."""
    try:
        return int(meta["step"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return int(load_checkpoint(out / "final.pt")["step"])




def same_run_or_fail(out: Path, meta: dict | None, p: TrainParams, deps: dict) -> None:
    """A finished run in ``out`` (its ``meta``) trained with other train params is not this run: say which keys
    differ instead of "nothing left to do" over a model the config does not describe (other input caches: a
    warning)."""
    if meta is None:
        return  # older runs without meta.json: the checkpoint signature is checked on resume
    mine, theirs = p.model_dump(mode="json"), meta.get("params") or {}
    # a key the run does not record is newer than the run (added with a default that keeps the old behaviour)
    diff = [f"train.{k}: {json.dumps(theirs[k])} there, {json.dumps(mine.get(k))} here"
            for k in sorted(theirs) if k not in OPERATIONAL and mine.get(k) != theirs[k]]
    tail = lambda url: str(url).rstrip("/").rsplit("/", 1)[-1]  # noqa: E731 - the cache folders' fingerprints
    moved = [f"{k} {tail(url)} -> {tail(deps.get(k))}" for k, url in sorted((meta.get("deps") or {}).items())
             if tail(deps.get(k)) != tail(url)]
    if moved and not diff:
        # a warning, not an error: a moved dataset root changes the caches' fingerprints too, and a finished run
        # must not be thrown away for that
        console.print(f"warning: {out} was trained on other input caches than this config's ({', '.join(moved)}): "
                      "a moved dataset root, or changed segments / clip-features / prototypes params; pass --restart "
                      "to train on these", markup=False)
    if diff:
        raise TrainingError(f"{out} holds a finished run of another configuration ({'; '.join(diff)}); set another "
                            "train.out, or pass --restart to replace it")


def same_inputs_or_fail(out: Path, meta: dict | None, rows: dict) -> None:
    """A finished run in ``out`` trained on other images (added, removed, changed or recomputed in the upstream
    caches) is stale: say what changed instead of "nothing left to do" (only a fixed ``train.out`` can hold one:
    the default folder is named by a fingerprint that digests the inputs)."""
    if not meta or meta.get("inputs") is None:
        return
    before = read_input_rows(str(out))
    change = describe_input_change(before, rows) if before is not None else []
    if change:
        raise TrainingError(f"{out} holds a run trained on other inputs ({'; '.join(change)}); pass --restart to "
                            "train on the current ones, or leave train.out unset (named runs are retrained by "
                            "`clips4 repro`)")


def commit_run(out: Path, cfg: Config, fp: str, signature: dict, deps: dict, step: int, dataset: Dataset) -> None:
    """meta.json + inputs.parquet + index.parquet (written last) make a finished run visible to ``clips4 cache ls``
    and ``clips4 status``."""
    from clips4.pipeline.cache import commit_files

    rows = input_rows(cfg, "train", dataset)
    write_input_rows(str(out), rows)
    meta = {"stage": "train", "fingerprint": fp, "params": cfg.params("train").model_dump(mode="json"),
            "deps": deps, "signature": signature, "step": step, "code": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dataset": dataset.describe(), "inputs": input_digests(cfg, "train", dataset, rows),
            "n_images": len(selected_ids(dataset))}
    commit_files(str(out), list(cfg.decl("train").outs), meta)  # stages.yaml outs: what a finished run holds


#: what a published run folder holds (copied from the run's cache folder; ``run.json`` written last)
PUBLISHED = ("final.pt", "config.json", "meta.json", "metrics.jsonl")


def publish_run(run_dir: Path, dest: Path, *, name: str, fingerprint: str) -> Path:
    """Publish the finished run in ``run_dir`` as the named run ``dest`` (``runs/<name>/``): its files are
    replaced one by one (hard links where the file system allows, else copies; each by rename, so a reader sees
    a whole old or a whole new ``final.pt``), then ``run.json`` names the cache folder and fingerprint."""
    import shutil
    import uuid

    from clips4.pipeline.lock import StageLock

    dest.mkdir(parents=True, exist_ok=True)
    with StageLock(str(dest), wait=True, timeout=600):
        for f in PUBLISHED:
            src = run_dir / f
            if not src.exists():
                continue
            tmp = dest / f".{f}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
            os.replace(tmp, dest / f)
        doc = {"name": name, "fingerprint": fingerprint, "cache": str(run_dir.resolve()),
               "published": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = dest / f".run.json.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, dest / "run.json")
    return dest
