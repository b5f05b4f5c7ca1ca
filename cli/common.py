"""What every command shares: the options (one declaration, one meaning), ``build_config``, the consoles, the
exit codes, and the ``--json`` summary.

Exit codes, the same in every command: 0 done, 1 the run failed (or too many items failed), 2 usage or config
error (a bad option or value, a missing file, weights or optional package), 3 locked by another run, 130/143
interrupted (SIGINT/SIGTERM).
"""
from __future__ import annotations

import functools
import inspect
import json
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import typer
from clips4.pipeline.console import make_console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


console = make_console()
err_console = make_console(stderr=True)


class CLIError(Exception):
    """A user-facing mistake: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------- shared options
ConfigOpt = typer.Option(None, "--config", "-c", help="Extra YAML file(s) layered over stages.yaml (repeatable), or the name of a bundled one: paper (the published configuration), synthetic.")
SetOpt = typer.Option(None, "--set", "-s", help="Override any param: PATH=VALUE, e.g. segments.ucm_threshold=0.3 (repeatable).")
StagesOpt = typer.Option(None, "--stages", help="stages.yaml to use (default: the nearest one in this folder or its parents).")
DatasetOpt = typer.Option(None, "--dataset", "-d", help="Dataset kind: folder, voc, context, cocostuff, davis, bsds.")
RootOpt = typer.Option(None, "--root", "-r", help="Dataset root (local path or fsspec URL such as s3://bucket/voc).")
SplitOpt = typer.Option(None, "--split", help="Dataset split (default: the reader's, e.g. val).")
LimitOpt = typer.Option(None, "--limit", help="Only the first N images (sorted by id).")
CacheOpt = typer.Option(None, "--cache", help="Cache root (local path or fsspec URL); default from config: ./cache.")
ExecutorOpt = typer.Option(None, "--executor", help="'auto' (default: this process for small runs or one worker, else Ray), 'ray' or 'local' (this process).")
WorkersOpt = typer.Option(None, "--num-workers", "-j", help="Number of Ray worker actors.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output (the final summary is still printed).")
JsonOpt = typer.Option(False, "--json", help="Print one machine-readable JSON summary on stdout (human output goes to stderr).")
SummaryOpt = typer.Option(None, "--summary-json", help="Also write the JSON summary to this file.")
AddressOpt = typer.Option(None, "--address", help="Ray address: 'local' (start one here), 'auto', host:port or ray://host:10001.")
BatchOpt = typer.Option(None, "--batch-size", help="Images per task (one cache part per batch).")
MaxFailOpt = typer.Option(0, "--max-failures", help="Exit 1 when more than this many images failed, counting earlier runs' (-1: never).")
RetryOpt = typer.Option(False, "--retry-failed", help="Process images that failed before again (changed files always are).")
WaitOpt = typer.Option(False, "--wait", help="If another run holds this stage output, wait for it instead of exiting 3.")
WaitTimeoutOpt = typer.Option(None, "--wait-timeout", help="With --wait: give up (exit 3) after this many seconds.")
DeviceOpt = typer.Option("auto", "--device", help="Torch device for checkpoints: auto (cuda if available), cpu, cuda:0.")


# ------------------------------------------------------------------------------------------- stage options
#: every option that sets a stage parameter: python name -> (flag, --set path, type, help). A command whose
#: upstream includes a stage accepts all of that stage's options, with the same meaning everywhere.
STAGE_OPTIONS: dict[str, dict[str, tuple[str, str, type, str]]] = {
    "segments": {
        "detector": ("--detector", "segments.detector", str, "Contour detector: learned (default, the shipped ONNX net), classical (no weights), hed, onnx."),
        "ucm_threshold": ("--ucm-threshold", "segments.ucm_threshold", float, "UCM level at which superpixels are cut (default 0.25)."),
        "max_segments": ("--max-segments", "segments.max_segments", int, "At most this many superpixels per image (default 48)."),
    },
    "clip_features": {
        "clip_model": ("--clip-model", "clip_features.clip.model", str, "open_clip model name (default ViT-B-16; RN50 works too)."),
        "clip_pretrained": ("--clip-pretrained", "clip_features.clip.pretrained", str, "CLIP weights: pretrained tag (openai), hf-hub:org/repo, local-dir:/path or a file."),
        "clip_checkpoint": ("--clip-checkpoint", "clip_features.clip.checkpoint", str, "Local CLIP checkpoint file (overrides --clip-pretrained)."),
        "clip_cache_dir": ("--clip-cache-dir", "clip_features.clip.cache_dir", str, "Folder where CLIP weights are looked for / downloaded to."),
        "variant": ("--variant", "clip_features.clip.variant", str, "Dense feature variant: maskclip (paper), sclip, clearclip, naclip."),
        "backend": ("--backend", "clip_features.clip.backend", str, "Another vision-language backend as package.module:Factory."),
        "segment_source": ("--segment-source", "clip_features.segment_source", str, "CLIP segments from 'kmeans' over CLIP features (paper) or 'ucm' superpixels."),
    },
    "prototypes": {
        "classes": ("--classes", "prototypes.classes", str, "Known classes: voc (= voc20), context59, cocostuff171, a text file, 'dataset' (the dataset's classes.txt) or 'none' (class-free)."),
        "top_m": ("--top-m", "prototypes.top_m", int, "Known prototype = mean of the top-m segments (default 32)."),
        "n_unknown": ("--n-unknown", "prototypes.n_unknown", int, "Number of unknown prototypes (default 64)."),
    },
    "train": {
        "iterations": ("--iterations", "train.iterations", int, "Training iterations (paper: 20k VOC/Context, 80k COCO-Stuff)."),
        "backbone": ("--backbone", "train.backbone", str, "resnet50 (paper), resnet18 or tiny."),
        "backbone_weights": ("--backbone-weights", "train.backbone_weights", str, "imagenet, a local weights file, or 'random' (explicit)."),
        "name": ("--name", "train.name", str, "Name of the training run: published as <runs_root>/NAME/final.pt (default: train.name, 'train')."),
    },
}
#: each stage and the stages upstream of it (stages.yaml's graph), in graph order
UPSTREAM = {"segments": ("segments",), "clip_features": ("segments", "clip_features"),
            "prototypes": ("segments", "clip_features", "prototypes"),
            "train": ("segments", "clip_features", "prototypes", "train")}


def stage_option_set(stage: str, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, str, type, str]]:
    """The options of ``stage`` and its upstream stages (minus ``skip``: names the command uses otherwise)."""
    return {k: v for s in UPSTREAM[stage] for k, v in STAGE_OPTIONS[s].items() if k not in skip}


def _stage_sets(values: dict[str, Any], table: dict[str, tuple[str, str, type, str]]) -> list[str]:
    out = []
    for k, v in values.items():
        if v is None:
            continue
        path = table[k][1]
        if k == "classes" and str(v).lower() in ("none", "null", ""):
            out.append(f"{path}=null")
        else:
            out.append(f"{path}={json.dumps(v) if isinstance(v, str) else v}")
    return out


@dataclass
class Common:
    """The shared options of one command invocation (what :func:`common_options` injects)."""

    config: list[Path] = field(default_factory=list)
    set_: list[str] = field(default_factory=list)
    stages: Optional[Path] = None
    dataset: Optional[str] = None
    root: Optional[str] = None
    split: Optional[str] = None
    limit: Optional[int] = None
    cache: Optional[str] = None
    executor: Optional[str] = None
    num_workers: Optional[int] = None
    quiet: bool = False
    json: bool = False
    summary_json: Optional[Path] = None
    #: ``--set`` items from the stage options given (``--clip-pretrained`` ...; see :data:`STAGE_OPTIONS`)
    stage_sets: list[str] = field(default_factory=list)

    def build_config(self, *, extra: list[str] | None = None, **flags):
        """The resolved :class:`~clips4.pipeline.config.Config` of this invocation; ``flags`` override the shared
        options (e.g. ``dataset="bsds"``), ``extra`` are more ``--set`` items (after the stage options)."""
        kw = {k: getattr(self, k) for k in ("dataset", "root", "split", "limit", "cache", "executor", "num_workers")}
        kw.update(flags)
        return build_config(self.config, self.set_ + self.stage_sets, self.stages, extra=extra, **kw)


#: name -> (annotation, default option); the order is the order in --help
_DATASET_OPTS = {
    "config": (Optional[List[Path]], ConfigOpt), "set_": (Optional[List[str]], SetOpt),
    "stages": (Optional[Path], StagesOpt), "dataset": (Optional[str], DatasetOpt), "root": (Optional[str], RootOpt),
    "split": (Optional[str], SplitOpt), "limit": (Optional[int], LimitOpt), "cache": (Optional[str], CacheOpt),
    "executor": (Optional[str], ExecutorOpt), "num_workers": (Optional[int], WorkersOpt),
}
_CONFIG_OPTS = {k: _DATASET_OPTS[k] for k in ("config", "set_", "stages", "cache")}
_OUTPUT_OPTS = {"quiet": (bool, QuietOpt), "json": (bool, JsonOpt), "summary_json": (Optional[Path], SummaryOpt)}

#: the summary of the command being run (``main`` prints it for errors too when --json was given)
_current: dict[str, Any] = {}


def common_options(name: str, *, dataset: bool | None = True, stage: str | None = None, skip: tuple[str, ...] = ()):
    """Decorator: add the shared options to a command (``dataset=False``: only config/cache + output options;
    ``None``: only the output options) and pass them as ``opts: Common``. ``stage``: also every option of that
    stage and its upstream stages (:data:`STAGE_OPTIONS`, less ``skip``), turned into ``--set`` items. The command
    returns a summary dict (or None); it is printed with ``--json`` and written with ``--summary-json``."""
    stage_opts = stage_option_set(stage, skip) if stage else {}
    extra = {**(_DATASET_OPTS if dataset else _CONFIG_OPTS if dataset is False else {}),
             **{k: (Optional[t], typer.Option(None, flag, help=h)) for k, (flag, _, t, h) in stage_opts.items()},
             **_OUTPUT_OPTS}

    def deco(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        sig = inspect.signature(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name != "opts"]
        added = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
                 for k, (ann, opt) in extra.items()]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            given = {k: kwargs.pop(k) for k in stage_opts}
            opts = Common(**{k: kwargs.pop(k) for k in extra if k not in stage_opts})
            opts.stage_sets = _stage_sets(given, stage_opts)
            opts.config, opts.set_ = list(opts.config or []), list(opts.set_ or [])
            _current.clear()
            _current.update({"command": name, "json": opts.json, "summary_json": opts.summary_json, "t0": time.time()})
            saved = console._file  # None = follow sys.stdout
            if opts.json:  # stdout carries only the JSON document
                console.file = sys.stderr
            try:
                summary = fn(opts=opts, **kwargs) or {}
            finally:
                console._file = saved
            code = int(summary.pop("exit_code", 0))
            emit_summary(summary, code)
            if code:
                raise typer.Exit(code)

        wrapper.__signature__ = sig.replace(parameters=[*own, *added], return_annotation=None)
        wrapper.__annotations__ = {**{p.name: p.annotation for p in own}, **{k: a for k, (a, _) in extra.items()}}
        return wrapper

    return deco


def emit_summary(summary: dict, code: int, error: str | None = None) -> None:
    """Print / write the ``--json`` summary of the current command (no-op without --json/--summary-json)."""
    if not _current or not (_current.get("json") or _current.get("summary_json")):
        return
    status = {EXIT_OK: "ok", EXIT_LOCKED: "locked", EXIT_SIGINT: "interrupted", EXIT_SIGTERM: "interrupted",
              EXIT_USAGE: "usage_error"}.get(code, "failed")
    doc = {"command": _current["command"], "status": status, "exit_code": code,
           "seconds": round(time.time() - _current["t0"], 3), **summary}
    if error:
        doc["error"] = error
    text = json.dumps(doc, default=str, indent=None)
    if _current.get("summary_json"):
        p = Path(_current["summary_json"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
    if _current.get("json"):
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    _current.clear()


def build_config(
    config: Optional[List[Path]] = None,
    set_: Optional[List[str]] = None,
    stages: Optional[Path] = None,
    *,
    dataset: str | None = None,
    root: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    cache: str | None = None,
    address: str | None = None,
    num_workers: int | None = None,
    batch_size: int | None = None,
    executor: str | None = None,
    extra: list[str] | None = None,
):
    """Config from files + flags. Flags become ``--set`` overrides so they are validated the same way."""
    from clips4.pipeline.config import ConfigError, load_config

    overrides = list(set_ or [])
    flag_map = {
        "dataset.kind": dataset, "dataset.root": root, "dataset.split": split, "dataset.limit": limit,
        "cache_root": cache, "ray.address": address, "ray.num_workers": num_workers,
        "ray.batch_size": batch_size, "ray.executor": executor,
    }
    for k, v in flag_map.items():
        if v is not None:
            overrides.append(f"{k}={json.dumps(v) if isinstance(v, str) else v}")
    overrides += extra or []
    try:
        return load_config(stages, config, overrides)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


def sets(prefix: str, values: dict[str, Any]) -> list[str]:
    """``--set`` items ``prefix.key=value`` for the options that were given (strings JSON-quoted)."""
    return [f"{prefix}.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items() if v is not None]
