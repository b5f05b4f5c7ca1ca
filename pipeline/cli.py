"""The ``clips4`` command line. ``main(argv)`` is callable from tests and returns the exit status."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from clips4.pipeline.config import Config, ConfigError, load_config

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="clips4",
    help="CLIP-S4: language-guided self-supervised semantic segmentation — offline pipeline and trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
precompute_app = typer.Typer(help="Run the offline pipeline stages into the cache.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect the stage caches.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate contours, segments and embeddings.", no_args_is_help=True)
app.add_typer(precompute_app, name="precompute")
app.add_typer(cache_app, name="cache")
app.add_typer(evaluate_app, name="evaluate")
synthetic_app = typer.Typer(help="The synthetic world: textured classes with known masks and a CLIP-like teacher.",
                            no_args_is_help=True)
app.add_typer(synthetic_app, name="synthetic")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------- shared options
ConfigOpt = typer.Option(None, "--config", "-c", help="Extra YAML file(s) layered over stages.yaml (repeatable).")
SetOpt = typer.Option(None, "--set", "-s", help="Override any param: PATH=VALUE, e.g. segments.ucm_threshold=0.3 (repeatable).")
StagesOpt = typer.Option(None, "--stages", help="stages.yaml to use (default: the nearest one in this folder or its parents).")
DatasetOpt = typer.Option(None, "--dataset", "-d", help="Dataset kind: folder, voc, context, cocostuff, davis, bsds.")
RootOpt = typer.Option(None, "--root", "-r", help="Dataset root (local path or fsspec URL such as s3://bucket/voc).")
SplitOpt = typer.Option(None, "--split", help="Dataset split (default: the reader's, e.g. val).")
LimitOpt = typer.Option(None, "--limit", help="Only the first N images (sorted by id).")
CacheOpt = typer.Option(None, "--cache", help="Cache root (local path or fsspec URL); default from config: ./cache.")
AddressOpt = typer.Option(None, "--address", help="Ray address: 'local' (start one here), 'auto' or ray://host:10001.")
WorkersOpt = typer.Option(None, "--num-workers", "-j", help="Number of Ray worker actors.")
BatchOpt = typer.Option(None, "--batch-size", help="Images per task (one cache part per batch).")
ExecutorOpt = typer.Option(None, "--executor", help="'ray' (default) or 'local' (this process; for debugging).")
MaxFailOpt = typer.Option(0, "--max-failures", help="Exit non-zero when more than this many images fail (-1: never).")
RetryOpt = typer.Option(False, "--retry-failed", help="Process images that failed before again (changed files always are).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")


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
) -> Config:
    """Config from files + flags. Flags become ``--set`` overrides so they are validated the same way."""
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


def _run_stage_command(name: str, cfg: Config, max_failures: int, retry_failed: bool, quiet: bool) -> None:
    from clips4.pipeline.stage import print_summary, run_stage

    run = run_stage(cfg, name, retry_failed=retry_failed, show_progress=not quiet)
    code = print_summary(run, max_failures)
    if code:
        raise typer.Exit(code)


# ----------------------------------------------------------------------------------------- precompute
@precompute_app.command("segments")
def precompute_segments(
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
    dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt, split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt, address: Optional[str] = AddressOpt,
    num_workers: Optional[int] = WorkersOpt, batch_size: Optional[int] = BatchOpt, executor: Optional[str] = ExecutorOpt,
    max_failures: int = MaxFailOpt, retry_failed: bool = RetryOpt, quiet: bool = QuietOpt,
    detector: Optional[str] = typer.Option(None, help="Contour detector: classical (default, no weights), hed, onnx."),
    ucm_threshold: Optional[float] = typer.Option(None, help="UCM level at which superpixels are cut (default 0.25)."),
    max_segments: Optional[int] = typer.Option(None, help="At most this many superpixels per image (default 48)."),
) -> None:
    """Contours → oriented watershed → UCM → superpixels for every image, into the segments cache."""
    extra = [f"segments.{k}={v}" for k, v in
             {"detector": detector, "ucm_threshold": ucm_threshold, "max_segments": max_segments}.items() if v is not None]
    cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache,
                       address=address, num_workers=num_workers, batch_size=batch_size, executor=executor, extra=extra)
    _run_stage_command("segments", cfg, max_failures, retry_failed, quiet)


@precompute_app.command("clip-features")
def precompute_clip_features(
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
    dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt, split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt, address: Optional[str] = AddressOpt,
    num_workers: Optional[int] = WorkersOpt, batch_size: Optional[int] = BatchOpt, executor: Optional[str] = ExecutorOpt,
    max_failures: int = MaxFailOpt, retry_failed: bool = RetryOpt, quiet: bool = QuietOpt,
    clip_model: Optional[str] = typer.Option(None, help="open_clip model name (default ViT-B-16; RN50 works too)."),
    clip_pretrained: Optional[str] = typer.Option(None, help="Pretrained tag (openai), hf-hub:org/repo, local-dir:/path or a file."),
    clip_checkpoint: Optional[str] = typer.Option(None, help="Local CLIP checkpoint file (overrides --clip-pretrained)."),
    clip_cache_dir: Optional[str] = typer.Option(None, help="Folder where CLIP weights are looked for / downloaded to."),
    variant: Optional[str] = typer.Option(None, help="Dense feature variant: maskclip (paper), sclip, clearclip, naclip."),
    backend: Optional[str] = typer.Option(None, help="Another vision-language backend as package.module:Factory."),
    segment_source: Optional[str] = typer.Option(None, help="CLIP segments from 'kmeans' over CLIP features (paper) or 'ucm' superpixels."),
    num_gpus: Optional[float] = typer.Option(None, help="GPUs per actor where CUDA exists."),
) -> None:
    """CLIP dense pixel embeddings (clip-i) and CLIP segment embeddings for every image, into the cache."""
    extra = [f"clip_features.clip.{k}={json.dumps(v)}" for k, v in {
        "model": clip_model, "pretrained": clip_pretrained, "checkpoint": clip_checkpoint, "cache_dir": clip_cache_dir,
        "variant": variant, "backend": backend}.items() if v is not None]
    if segment_source is not None:
        extra.append(f"clip_features.segment_source={segment_source}")
    if num_gpus is not None:
        extra.append(f"ray.num_gpus={num_gpus}")
    cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache,
                       address=address, num_workers=num_workers, batch_size=batch_size, executor=executor, extra=extra)
    _run_stage_command("clip_features", cfg, max_failures, retry_failed, quiet)


@precompute_app.command("prototypes")
def precompute_prototypes(
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
    dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt, split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt,
    classes: Optional[str] = typer.Option(None, help="Known classes: voc, context59, cocostuff171, a text file, or 'none' (class-free)."),
    top_m: Optional[int] = typer.Option(None, help="Known prototype = mean of the top-m segments (default 32)."),
    n_unknown: Optional[int] = typer.Option(None, help="Number of unknown prototypes (default 64)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the unknown prototypes' sampling."),
) -> None:
    """Known-class prototypes (top-m CLIP segments per class text, FAISS) and unknown prototypes."""
    extra = []
    if classes is not None:
        extra.append(f"prototypes.classes={'null' if classes.lower() in ('none', 'null', '') else json.dumps(classes)}")
    for k, v in {"top_m": top_m, "n_unknown": n_unknown, "seed": seed}.items():
        if v is not None:
            extra.append(f"prototypes.{k}={v}")
    cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache, extra=extra)
    _run_stage_command("prototypes", cfg, 0, False, True)


@app.command("search")
def search_command(
    query: str = typer.Argument(..., help="Text to look for, e.g. 'a photo of the moon'."),
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
    dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt, split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt,
    top: int = typer.Option(16, "--top", help="Number of segments to return."),
    out: Path = typer.Option(Path("search.png"), "--out", help="Contact sheet PNG to write."),
    templates: bool = typer.Option(False, "--templates", help="Average the query over the 85 prompt templates (for bare class names)."),
) -> None:
    """Find the cached CLIP segments closest to a text (FAISS over all segment embeddings) and draw a contact sheet."""
    import numpy as np

    from clips4 import data as bundled
    from clips4.pipeline.backends import text_embeddings
    from clips4.pipeline.cache import url_join
    from clips4.pipeline.config import ClipFeaturesParams
    from clips4.pipeline.processors import build_backend
    from clips4.pipeline.prototypes import iter_embedding_batches
    from clips4.pipeline.search import SegmentIndex, contact_sheet
    from clips4.pipeline.stage import dataset_from_config, open_stage

    cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache)
    ds = dataset_from_config(cfg)
    feats = open_stage(cfg, "clip_features", ds)

    def batches():
        return iter_embedding_batches(feats.iter_table("segments", columns=["row_id", "embedding"]))

    # the index is derived from one clip_features output: it lives beside it, named by that fingerprint
    index_path = url_join(cfg.cache_root, ds.key, "search", feats.fingerprint, "segments.faiss")
    index = SegmentIndex.load_or_build(index_path, batches)
    backend = build_backend(ClipFeaturesParams.model_validate(feats.meta["params"]).clip)
    text = text_embeddings(backend, [query], bundled.prompt_templates() if templates else ["{}"])[0]
    hits = index.query(text, top=top)
    wanted = {int(r): float(sc) for r, sc in hits}
    rows = {}
    for b in feats.iter_table("segments", columns=["row_id", "image_id", "segment_id", "bbox"]):
        ids = b.column("row_id").to_numpy()
        for i in np.flatnonzero(np.isin(ids, list(wanted))):
            rows[int(ids[i])] = {k: b.column(k)[int(i)].as_py() for k in ("image_id", "segment_id", "bbox")}
    sheet = []
    table = Table(title=f"top {len(hits)} segments for {query!r}")
    for col in ("rank", "score", "image", "segment"):
        table.add_column(col)
    for rank, (rid, score) in enumerate(hits, 1):
        r = rows[int(rid)]
        mask = feats.get(r["image_id"], "segment_labels") == r["segment_id"]
        sheet.append({"image_path": feats.row(r["image_id"])["path"], "mask": mask, "bbox": r["bbox"], "score": score,
                      "image_id": r["image_id"], "segment_id": r["segment_id"]})
        table.add_row(str(rank), f"{score:.3f}", r["image_id"], str(r["segment_id"]))
    console.print(table)
    contact_sheet(sheet, str(out), title=query)
    console.print(f"contact sheet: {out}")


@app.command("train")
def train_command(
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
    dataset: Optional[str] = DatasetOpt, root: Optional[str] = RootOpt, split: Optional[str] = SplitOpt,
    limit: Optional[int] = LimitOpt, cache: Optional[str] = CacheOpt, quiet: bool = QuietOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run from its last checkpoint."),
    restart: bool = typer.Option(False, "--restart", help="Start over, ignoring (and later replacing) checkpoints."),
    iterations: Optional[int] = typer.Option(None, help="Training iterations (paper: 20k VOC/Context, 80k COCO-Stuff)."),
    backbone: Optional[str] = typer.Option(None, help="resnet50 (paper), resnet18 or tiny."),
    backbone_weights: Optional[str] = typer.Option(None, help="imagenet, a local weights file, or 'random' (explicit)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: the cache, named by fingerprint)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this step (the run can be resumed)."),
) -> None:
    """Train the pixel embedding network from the cached segments, CLIP features and prototypes."""
    from clips4.trainer.train import train

    extra = [f"train.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in
             {"iterations": iterations, "backbone": backbone, "backbone_weights": backbone_weights, "out": out}.items()
             if v is not None]
    cfg = build_config(config, set_, stages, dataset=dataset, root=root, split=split, limit=limit, cache=cache, extra=extra)
    train(cfg, resume=resume, restart=restart, max_steps=max_steps, show_progress=not quiet)


@synthetic_app.command("make")
def synthetic_make(
    root: Path = typer.Option(Path("outputs/synthetic-world"), "--root", help="Folder to write the world into."),
    n_train: int = typer.Option(64, help="Training images."),
    n_val: int = typer.Option(16, help="Held-out validation images."),
    n_classes: int = typer.Option(6, help="Number of textured classes (2..10)."),
    height: int = typer.Option(96, help="Image height."),
    width: int = typer.Option(128, help="Image width."),
    seed: int = typer.Option(0, help="World seed (the teacher's backend_params.world_seed must match)."),
) -> None:
    """Write a synthetic world (images/<split>, masks/<split>, classes.txt) for the folder dataset reader."""
    from clips4.pipeline.synthetic import SyntheticWorld

    info = SyntheticWorld(n_classes=n_classes, image_size=(height, width), seed=seed).write(root, n_train, n_val)
    console.print(f"synthetic world: {info.get('train', 0)} train + {info.get('val', 0)} val images, "
                  f"classes {', '.join(info['classes'])} → {root}")


@synthetic_app.command("config")
def synthetic_config() -> None:
    """Print the bundled synthetic-world config (save it and pass it with --config)."""
    from importlib import resources

    print(resources.files("clips4.data").joinpath("configs", "synthetic.yaml").read_text(), end="")


# ---------------------------------------------------------------------------------------------- cache
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@cache_app.command("ls")
def cache_ls(
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
    cache: Optional[str] = CacheOpt,
    params: bool = typer.Option(False, "--params", help="Show every stage's params in full."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List stage outputs: dataset, stage, fingerprint, state, image counts, size and params."""
    from clips4.pipeline.cache import list_stage_outputs

    cfg = build_config(config, set_, stages, cache=cache)
    rows = list_stage_outputs(cfg.cache_root)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    if not rows:
        console.print(f"no stage outputs under {cfg.cache_root}")
        return
    table = Table(title=f"stage outputs in {cfg.cache_root}")
    for col in ("dataset", "stage", "fingerprint", "state", "images", "failed", "size", "created"):
        table.add_column(col, no_wrap=col in ("fingerprint", "dataset"))
    for r in rows:
        table.add_row(r["dataset"], r["stage"], r["fingerprint"], r["state"], str(r["images"]), str(r["failed"]),
                      _human(r["bytes"]), r["created"][:16].replace("T", " "))
    wide = console if console.is_terminal else Console(width=160)  # logs from cron are not 80 columns
    wide.print(table)
    for r in rows:
        flat = _flatten(r["params"])
        text = ", ".join(f"{k}={v}" for k, v in flat.items())
        if not params and len(text) > 200:
            text = text[:197] + "..."
        wide.print(f"[bold]{r['stage']}[/] {r['fingerprint']}: {text}\n  {r['url']}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", help="Folder for the demo's images, caches and pictures."),
    num_workers: int = typer.Option(2, "--num-workers", "-j", help="Ray workers."),
    executor: str = typer.Option("ray", "--executor", help="'ray' or 'local'."),
    iterations: int = typer.Option(300, "--iterations", help="Training iterations of the synthetic-world run."),
    clip_checkpoint: Optional[str] = typer.Option(None, help="Real CLIP weights (ViT-B-16) to run the CLIP stages on the samples."),
) -> None:
    """Run every stage on sample images and a synthetic world, offline, and print where outputs are."""
    from clips4.pipeline.demo import run_demo

    code = run_demo(out, num_workers=num_workers, executor=executor, iterations=iterations, clip_checkpoint=clip_checkpoint)
    if code:
        raise typer.Exit(code)


@evaluate_app.command("boundaries")
def evaluate_boundaries_command(
    root: Optional[str] = typer.Option(None, "--root", "-r", help="BSDS500-layout folder (images/<split>, groundTruth/<split>); default ../shared/data/BSDS500 beside the repo."),
    split: str = typer.Option("test", help="Split to score: test, val or train."),
    thresholds: int = typer.Option(99, help="Number of evenly spaced thresholds (BSDS uses 99; fewer for a quick look)."),
    limit: Optional[int] = LimitOpt,
    workers: int = typer.Option(2, help="Ray workers for the boundary matching (~0.1 s per threshold per annotator)."),
    out: Optional[Path] = typer.Option(None, help="Folder for boundaries.json, the PR-curve PNG and the per-image counts (reruns score only missing images)."),
    detector: Optional[str] = typer.Option(None, help="Contour detector of the segments stage (classical, hed, onnx)."),
    config: Optional[List[Path]] = ConfigOpt, set_: Optional[List[str]] = SetOpt, stages: Optional[Path] = StagesOpt,
    cache: Optional[str] = CacheOpt, executor: Optional[str] = ExecutorOpt, num_workers: Optional[int] = WorkersOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Score the segments stage on BSDS500: contour map (after NMS) and UCM boundary P/R/F at ODS and OIS, AP,
    and segmentation covering. Runs the segments stage there first, or reuses its cache."""
    from clips4.evaluate.boundaries import _default_root, evaluate_boundaries
    from clips4.pipeline.cache import StageReader
    from clips4.pipeline.stage import print_summary, run_stage

    root = root or str(_default_root())
    extra = [f"segments.detector={detector}"] if detector else []
    cfg = build_config(config, set_, stages, dataset="bsds", root=root, split=split, limit=limit, cache=cache,
                       executor=executor, num_workers=num_workers, extra=extra)
    run = run_stage(cfg, "segments", show_progress=not quiet)
    if print_summary(run, max_failures=-1):
        raise typer.Exit(1)
    reader = StageReader(run.url)

    def predictions(image_id: str) -> dict:
        return {k: reader.get(image_id, k) for k in ("contours", "orientation", "ucm")}

    evaluate_boundaries(root, split=split, thresholds=thresholds, limit=limit, workers=workers, out_dir=out,
                        predictions=predictions, image_ids=reader.image_ids,
                        executor="ray" if cfg.ray.executor == "ray" else "local", ray_address=cfg.ray.address)


def _mount_optional_commands() -> None:
    """Commands whose functions live in the evaluate package, mounted under their groups."""
    from importlib import import_module

    import typer.main as tm

    for module, attr, group, name in (
        ("clips4.evaluate.davis", "davis_command", evaluate_app, "davis"),
        ("clips4.trainer.edges_cli", "train_contours_command", app, "train-contours"),
    ):
        fn = getattr(import_module(module), attr)
        group.command(name)(fn)
        try:  # a broken option declaration must not take the whole CLI down with it
            tm.get_command_from_info(group.registered_commands[-1], pretty_exceptions_short=True, rich_markup_mode=None)
        except Exception as exc:  # noqa: BLE001
            group.registered_commands.pop()
            err_console.print(f"[yellow]warning:[/] command {name!r} is unavailable: {exc}")


_mount_optional_commands()


def _mount_task_commands() -> None:
    """evaluate language/unsupervised/avgsim/class-free, predict and report (they reuse the options above)."""
    from clips4.evaluate.tasks import register_commands

    register_commands(app, evaluate_app)


_mount_task_commands()


try:
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # older typer uses click itself
    class _TyperClickException(Exception):  # type: ignore[no-redef]
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status instead of exiting (tests call ``main([...])``)."""
    import click

    from clips4.pipeline.cache import CacheError
    from clips4.pipeline.datasets import DatasetError

    try:
        rv = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except _TyperClickException as exc:  # typer >= 0.29 raises its own bundled copy of click's exceptions
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 0
        exc.show()
        return getattr(exc, "exit_code", 2)
    except (CLIError, ConfigError, DatasetError, CacheError, FileNotFoundError) as exc:
        err_console.print(f"[red]error:[/] {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - stage errors with their own clear messages
        from clips4.pipeline.runner import WorkerStartError
        from clips4.pipeline.stage import StageError
        from clips4.trainer.checkpoint import CheckpointError
        from clips4.trainer.model import WeightsError
        from clips4.trainer.train import TrainingError

        known = (StageError, WorkerStartError, CheckpointError, WeightsError, TrainingError)
        try:
            from clips4.pipeline.clip_models import WeightsMismatchError, WeightsNotFoundError

            known += (WeightsMismatchError, WeightsNotFoundError)
        except ImportError:
            pass
        if isinstance(exc, known):
            err_console.print(f"[red]error:[/] {exc}")
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
