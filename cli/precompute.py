"""``clips4 precompute segments | clip-features | prototypes``: run a pipeline stage into the cache."""
from __future__ import annotations

from typing import Optional

import typer

from clips4.cli.common import (AddressOpt, BatchOpt, Common, MaxFailOpt, RetryOpt, WaitOpt, WaitTimeoutOpt,
                               common_options, sets)

app = typer.Typer(help="Run the offline pipeline stages into the cache.", no_args_is_help=True)


def run_stage_command(name: str, cfg, opts: Common, *, max_failures: int = 0, retry_failed: bool = False,
                      wait: bool = False, wait_timeout: float | None = None) -> dict:
    """Run one stage, print its summary, return the ``--json`` summary (with ``exit_code``)."""
    from clips4.pipeline.stage import print_summary, run_stage

    run = run_stage(cfg, name, retry_failed=retry_failed, show_progress=not opts.quiet, wait=wait,
                    wait_timeout=wait_timeout)
    code = print_summary(run, max_failures)
    return {**run.to_dict(), "exit_code": code}


@app.command("segments")
@common_options("precompute segments")
def segments(
    opts: Common,
    address: Optional[str] = AddressOpt, batch_size: Optional[int] = BatchOpt,
    max_failures: int = MaxFailOpt, retry_failed: bool = RetryOpt,
    wait: bool = WaitOpt, wait_timeout: Optional[float] = WaitTimeoutOpt,
    detector: Optional[str] = typer.Option(None, help="Contour detector: learned (default, the shipped ONNX net), classical (no weights), hed, onnx."),
    ucm_threshold: Optional[float] = typer.Option(None, help="UCM level at which superpixels are cut (default 0.25)."),
    max_segments: Optional[int] = typer.Option(None, help="At most this many superpixels per image (default 48)."),
) -> dict:
    """Contours → oriented watershed → UCM → superpixels for every image, into the segments cache."""
    extra = sets("segments", {"detector": detector, "ucm_threshold": ucm_threshold, "max_segments": max_segments})
    cfg = opts.build_config(address=address, batch_size=batch_size, extra=extra)
    return run_stage_command("segments", cfg, opts, max_failures=max_failures, retry_failed=retry_failed, wait=wait,
                             wait_timeout=wait_timeout)


@app.command("clip-features")
@common_options("precompute clip-features")
def clip_features(
    opts: Common,
    address: Optional[str] = AddressOpt, batch_size: Optional[int] = BatchOpt,
    max_failures: int = MaxFailOpt, retry_failed: bool = RetryOpt,
    wait: bool = WaitOpt, wait_timeout: Optional[float] = WaitTimeoutOpt,
    clip_model: Optional[str] = typer.Option(None, help="open_clip model name (default ViT-B-16; RN50 works too)."),
    clip_pretrained: Optional[str] = typer.Option(None, help="Pretrained tag (openai), hf-hub:org/repo, local-dir:/path or a file."),
    clip_checkpoint: Optional[str] = typer.Option(None, help="Local CLIP checkpoint file (overrides --clip-pretrained)."),
    clip_cache_dir: Optional[str] = typer.Option(None, help="Folder where CLIP weights are looked for / downloaded to."),
    variant: Optional[str] = typer.Option(None, help="Dense feature variant: maskclip (paper), sclip, clearclip, naclip."),
    backend: Optional[str] = typer.Option(None, help="Another vision-language backend as package.module:Factory."),
    segment_source: Optional[str] = typer.Option(None, help="CLIP segments from 'kmeans' over CLIP features (paper) or 'ucm' superpixels."),
    num_gpus: Optional[float] = typer.Option(None, help="GPUs per actor where CUDA exists."),
) -> dict:
    """CLIP dense pixel embeddings (clip-i) and CLIP segment embeddings for every image, into the cache."""
    extra = sets("clip_features.clip", {"model": clip_model, "pretrained": clip_pretrained, "checkpoint": clip_checkpoint,
                                        "cache_dir": clip_cache_dir, "variant": variant, "backend": backend})
    extra += sets("clip_features", {"segment_source": segment_source}) + sets("ray", {"num_gpus": num_gpus})
    cfg = opts.build_config(address=address, batch_size=batch_size, extra=extra)
    return run_stage_command("clip_features", cfg, opts, max_failures=max_failures, retry_failed=retry_failed,
                             wait=wait, wait_timeout=wait_timeout)


@app.command("prototypes")
@common_options("precompute prototypes")
def prototypes(
    opts: Common,
    classes: Optional[str] = typer.Option(None, help="Known classes: voc, context59, cocostuff171, a text file (relative to the dataset root or the working folder), 'dataset' (the dataset's own classes.txt) or 'none' (class-free)."),
    top_m: Optional[int] = typer.Option(None, help="Known prototype = mean of the top-m segments (default 32)."),
    n_unknown: Optional[int] = typer.Option(None, help="Number of unknown prototypes (default 64)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the unknown prototypes' sampling."),
) -> dict:
    """Known-class prototypes (top-m CLIP segments per class text, FAISS) and unknown prototypes."""
    extra = []
    if classes is not None:
        extra.append("prototypes.classes=null" if classes.lower() in ("none", "null", "") else sets("prototypes", {"classes": classes})[0])
    extra += sets("prototypes", {"top_m": top_m, "n_unknown": n_unknown, "seed": seed})
    cfg = opts.build_config(extra=extra)
    return run_stage_command("prototypes", cfg, opts)
