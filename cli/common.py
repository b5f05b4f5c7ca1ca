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


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class Opt:
    """One option's declaration: its flags, default, help, and the annotation it gets where :func:`common_options`
    adds it to a command itself."""

    flags: tuple[str, ...]
    default: Any = None
    help: str = ""
    type: Any = None


#: Every option that more than one command has, and every option that sets a configuration value: declared here
#: once (a test keeps it so). A command takes one in its signature with :func:`option` (its own default or help
#: where its meaning there is narrower, e.g. what ``--out`` holds); :func:`common_options` adds the groups below, the
#: stage options and the command's ``settings`` itself. An option of one command only, which sets nothing, is
#: declared inline with ``typer.Option`` where it is used.
OPTIONS: dict[str, Opt] = {
    # the configuration (every command that reads it)
    "config": Opt(("--config", "-c"), None, "Extra YAML file(s) layered over stages.yaml (repeatable), or the name of a bundled one: paper (the published configuration), synthetic.", Optional[List[Path]]),
    "set_": Opt(("--set", "-s"), None, "Override any param: PATH=VALUE, e.g. segments.ucm_threshold=0.3 (repeatable).", Optional[List[str]]),
    "stages": Opt(("--stages",), None, "stages.yaml to use (default: the nearest one in this folder or its parents).", Optional[Path]),
    "cache": Opt(("--cache",), None, "Cache root (local path or fsspec URL); default from config: ./cache.", Optional[str]),
    # the dataset and how the stages run over it
    "dataset": Opt(("--dataset", "-d"), None, "Dataset kind: folder, voc, context, cocostuff, davis, bsds.", Optional[str]),
    "root": Opt(("--root", "-r"), None, "Dataset root (local path or fsspec URL such as s3://bucket/voc).", Optional[str]),
    "split": Opt(("--split",), None, "Dataset split (default: the reader's, e.g. val).", Optional[str]),
    "limit": Opt(("--limit",), None, "Only the first N images (sorted by id).", Optional[int]),
    "executor": Opt(("--executor",), None, "'auto' (default: this process for small runs or one worker, else Ray), 'ray' or 'local' (this process).", Optional[str]),
    "num_workers": Opt(("--num-workers", "-j"), None, "Number of Ray worker actors.", Optional[int]),
    "address": Opt(("--address",), None, "Ray address: 'local' (start one here), 'auto', host:port or ray://host:10001.", Optional[str]),
    "batch_size": Opt(("--batch-size",), None, "Images per task (one cache part per batch).", Optional[int]),
    "num_gpus": Opt(("--num-gpus",), None, "GPUs per actor where CUDA exists.", Optional[float]),
    # output (every command)
    "quiet": Opt(("--quiet", "-q"), False, "No progress output (the final summary is still printed).", bool),
    "json": Opt(("--json",), False, "Print one machine-readable JSON summary on stdout (human output goes to stderr).", bool),
    "summary_json": Opt(("--summary-json",), None, "Also write the JSON summary to this file.", Optional[Path]),
    # running a stage or a training
    "max_failures": Opt(("--max-failures",), 0, "Exit 1 when more than this many images failed, counting earlier runs' (-1: never).", int),
    "retry_failed": Opt(("--retry-failed",), False, "Process images that failed before again (changed files always are).", bool),
    "wait": Opt(("--wait",), False, "If another run holds this stage output, wait for it instead of exiting 3.", bool),
    "wait_timeout": Opt(("--wait-timeout",), None, "With --wait: give up (exit 3) after this many seconds.", Optional[float]),
    "until": Opt(("--until",), None, "Only this stage and the stages it needs.", Optional[str]),
    "dry_run": Opt(("--dry-run",), False, "Only say what would be done.", bool),
    "restart": Opt(("--restart",), False, "Start over, ignoring (and later replacing) checkpoints.", bool),
    "precompute": Opt(("--precompute/--no-precompute",), False, "First run the stages this needs (cached images are skipped).", bool),
    # what a command reads and writes
    "out": Opt(("--out",), None, "Output folder.", Optional[Path]),
    "model": Opt(("--model",), "teacher", "'teacher' (cached CLIP dense features: the MaskCLIP baseline), or a trained run: its folder (runs/NAME), its name or a final.pt.", str),
    "checkpoint": Opt(("--checkpoint",), None, "A trained run: its folder (runs/NAME), its name or a final.pt; overrides --model.", Optional[Path]),
    "device": Opt(("--device",), "auto", "Torch device for checkpoints: auto (cuda if available), cpu, cuda:0.", str),
    "train_split": Opt(("--train-split",), None, "Split the training side reads.", Optional[str]),
    "segments": Opt(("--segments",), None, "Which cached segments: 'ucm' (the superpixels of the segments stage) or the CLIP ones.", Optional[str]),
    "seed": Opt(("--seed",), 0, "Seed.", Optional[int]),
    "lr": Opt(("--lr",), None, "Learning rate.", Optional[float]),
    "workers": Opt(("--workers",), 0, "Worker processes.", int),
    "width": Opt(("--width",), None, "Width.", Optional[int]),
    # stage parameters (STAGE_OPTIONS says which stage and key each one sets)
    "detector": Opt(("--detector",), None, "Contour detector: learned (default, the shipped ONNX net), classical (no weights), hed, onnx.", Optional[str]),
    "ucm_threshold": Opt(("--ucm-threshold",), None, "UCM level at which superpixels are cut (default 0.25).", Optional[float]),
    "max_segments": Opt(("--max-segments",), None, "At most this many superpixels per image (default 48).", Optional[int]),
    "clip_model": Opt(("--clip-model",), None, "open_clip model name (default ViT-B-16; RN50 works too).", Optional[str]),
    "clip_pretrained": Opt(("--clip-pretrained",), None, "CLIP weights: pretrained tag (openai), hf-hub:org/repo, local-dir:/path or a file.", Optional[str]),
    "clip_checkpoint": Opt(("--clip-checkpoint",), None, "Local CLIP checkpoint file (overrides --clip-pretrained).", Optional[str]),
    "clip_cache_dir": Opt(("--clip-cache-dir",), None, "Folder where CLIP weights are looked for / downloaded to.", Optional[str]),
    "variant": Opt(("--variant",), None, "Dense feature variant: maskclip (paper), sclip, clearclip, naclip.", Optional[str]),
    "backend": Opt(("--backend",), None, "Another vision-language backend as package.module:Factory.", Optional[str]),
    "segment_source": Opt(("--segment-source",), None, "CLIP segments from 'kmeans' over CLIP features (paper) or 'ucm' superpixels.", Optional[str]),
    "classes": Opt(("--classes",), None, "Known classes: voc (= voc20), context59, cocostuff171, a text file, 'dataset' (the dataset's classes.txt) or 'none' (class-free).", Optional[str]),
    "top_m": Opt(("--top-m",), None, "Known prototype = mean of the top-m segments (default 32).", Optional[int]),
    "n_unknown": Opt(("--n-unknown",), None, "Number of unknown prototypes (default 64).", Optional[int]),
    "iterations": Opt(("--iterations",), None, "Training iterations (paper: 20k VOC/Context, 80k COCO-Stuff).", Optional[int]),
    "backbone": Opt(("--backbone",), None, "resnet50 (paper), resnet18 or tiny.", Optional[str]),
    "backbone_weights": Opt(("--backbone-weights",), None, "imagenet, a local weights file, or 'random' (explicit).", Optional[str]),
    "name": Opt(("--name",), None, "Name of the training run: published as <runs_root>/NAME/final.pt (default: train.name, 'train').", Optional[str]),
}

_SAME: Any = object()


def option(name: str, default: Any = _SAME, *, help: str | None = None):  # noqa: A002 - typer's own word
    """The ``typer.Option`` of the declaration :data:`OPTIONS` holds for ``name``, with this command's own ``default``
    and ``help`` where given (``...``: required)."""
    o = OPTIONS[name]
    info = typer.Option(o.default if default is _SAME else default, *o.flags, help=help or o.help)
    info.clips4_option = name  # what the declaration test reads
    return info


#: every option that sets a stage parameter: stage -> {option: the key it sets}. A command whose upstream includes a
#: stage accepts all of that stage's options, with the same meaning everywhere.
STAGE_OPTIONS: dict[str, dict[str, str]] = {
    "segments": {"detector": "segments.detector", "ucm_threshold": "segments.ucm_threshold",
                 "max_segments": "segments.max_segments"},
    "clip_features": {"clip_model": "clip_features.clip.model", "clip_pretrained": "clip_features.clip.pretrained",
                      "clip_checkpoint": "clip_features.clip.checkpoint", "clip_cache_dir": "clip_features.clip.cache_dir",
                      "variant": "clip_features.clip.variant", "backend": "clip_features.clip.backend",
                      "segment_source": "clip_features.segment_source"},
    "prototypes": {"classes": "prototypes.classes", "top_m": "prototypes.top_m", "n_unknown": "prototypes.n_unknown"},
    "train": {"iterations": "train.iterations", "backbone": "train.backbone", "backbone_weights": "train.backbone_weights",
              "name": "train.name"},
}
#: each stage and the stages upstream of it (stages.yaml's graph), in graph order
UPSTREAM = {"segments": ("segments",), "clip_features": ("segments", "clip_features"),
            "prototypes": ("segments", "clip_features", "prototypes"),
            "train": ("segments", "clip_features", "prototypes", "train")}
#: the key each option of the dataset group sets (the command also reads them: ``opts.root``, ``opts.split`` ...)
DATASET_KEYS = {"dataset": "dataset.kind", "root": "dataset.root", "split": "dataset.split", "limit": "dataset.limit",
                "cache": "cache_root", "executor": "ray.executor", "num_workers": "ray.num_workers"}


def stage_option_set(stage: str) -> dict[str, str]:
    """The options of ``stage`` and its upstream stages: option -> the key it sets."""
    return {k: v for s in UPSTREAM[stage] for k, v in STAGE_OPTIONS[s].items()}


def _set_items(values: dict[str, Any], keys: dict[str, str]) -> list[str]:
    """``--set`` items ``key=value`` for the options that were given (strings and paths JSON-quoted; ``--classes
    none``: null)."""
    out = []
    for k, v in values.items():
        if v is None:
            continue
        if k == "classes" and str(v).lower() in ("none", "null", ""):
            out.append(f"{keys[k]}=null")
        else:
            out.append(f"{keys[k]}={json.dumps(str(v)) if isinstance(v, (str, Path)) else v}")
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
    #: ``--set`` items from the stage options and settings given (``--clip-pretrained`` ...; see
    #: :data:`STAGE_OPTIONS` and ``common_options(settings=...)``)
    stage_sets: list[str] = field(default_factory=list)

    def build_config(self, **flags):
        """The resolved :class:`~clips4.pipeline.config.Config` of this invocation; ``flags`` override the dataset
        group's options (e.g. ``dataset="bsds"``; ``split=None`` leaves the split to the configuration)."""
        kw = {k: getattr(self, k) for k in DATASET_KEYS}
        kw.update(flags)
        return build_config(self.config, self.set_ + self.stage_sets, self.stages, **kw)


_CONFIG_GROUP = ("config", "set_", "stages", "cache")
_DATASET_GROUP = ("config", "set_", "stages", "dataset", "root", "split", "limit", "cache", "executor", "num_workers")
_OUTPUT_GROUP = ("quiet", "json", "summary_json")

#: the summary of the command being run (``main`` prints it for errors too when --json was given)
_current: dict[str, Any] = {}


def common_options(name: str, *, dataset: bool | None = True, stage: str | None = None,
                   settings: dict[str, Any] | None = None):
    """Decorator that makes a function a command: ``name`` is its command line (``"precompute segments"``: the group,
    then the command; ``clips4.cli.app`` registers every command by it). It adds the shared options and passes them
    as ``opts: Common``: ``dataset=True`` the configuration and dataset group, ``False`` only the configuration
    (config, set, stages, cache), ``None`` neither; the output options (quiet, json, summary-json) always. ``stage``:
    also every option of that stage and its upstream stages (:data:`STAGE_OPTIONS`); ``settings``: ``{key: option}``
    for the command's own options that set a configuration key (an :data:`OPTIONS` name, or :func:`option` for its
    own help). Both become ``--set`` items; the function does not receive them. The command returns a summary dict
    (or None); it is printed with ``--json`` and written with ``--summary-json``."""
    keyed: dict[str, tuple[str, Any]] = {}  # python name -> (config key, the typer.Option)
    for opt_name, key in (stage_option_set(stage) if stage else {}).items():
        keyed[opt_name] = (key, option(opt_name))
    for key, given in (settings or {}).items():
        info = option(given) if isinstance(given, str) else given
        keyed[info.clips4_option] = (key, info)
    group = (_DATASET_GROUP if dataset else _CONFIG_GROUP if dataset is False else ()) + _OUTPUT_GROUP
    extra = {k: (OPTIONS[k].type, option(k)) for k in group}
    extra.update({k: (OPTIONS[k].type, info) for k, (_, info) in keyed.items()})
    keys = {k: key for k, (key, _) in keyed.items()}

    def deco(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        sig = inspect.signature(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name != "opts"]
        clash = sorted({p.name for p in own} & set(extra))
        if clash:
            raise TypeError(f"{name}: {clash} are added by common_options; do not declare them again")
        added = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
                 for k, (ann, opt) in extra.items()]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            given = {k: kwargs.pop(k) for k in keys}
            opts = Common(**{k: kwargs.pop(k) for k in group})
            opts.stage_sets = _set_items(given, keys)
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
        wrapper.command_name = name
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
    num_workers: int | None = None,
    executor: str | None = None,
):
    """Config from files + ``set_`` (the ``--set`` items, then the stage options and settings) + the dataset group's
    options, which become ``--set`` items too (:data:`DATASET_KEYS`), so they are validated the same way."""
    from clips4.pipeline.config import ConfigError, load_config

    given = {"dataset": dataset, "root": root, "split": split, "limit": limit, "cache": cache,
             "num_workers": num_workers, "executor": executor}
    overrides = list(set_ or []) + _set_items(given, DATASET_KEYS)
    try:
        return load_config(stages, config, overrides)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None

