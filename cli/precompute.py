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
@common_options("precompute segments", stage="segments")
def segments(
    opts: Common,
    address: Optional[str] = AddressOpt, batch_size: Optional[int] = BatchOpt,
    max_failures: int = MaxFailOpt, retry_failed: bool = RetryOpt,
    wait: bool = WaitOpt, wait_timeout: Optional[float] = WaitTimeoutOpt,
) -> dict:
    """Contours → oriented watershed → UCM → superpixels for every image, into the segments cache."""
    cfg = opts.build_config(address=address, batch_size=batch_size)
    return run_stage_command("segments", cfg, opts, max_failures=max_failures, retry_failed=retry_failed, wait=wait,
                             wait_timeout=wait_timeout)


@app.command("clip-features")
@common_options("precompute clip-features", stage="clip_features")
def clip_features(
    opts: Common,
    address: Optional[str] = AddressOpt, batch_size: Optional[int] = BatchOpt,
    max_failures: int = MaxFailOpt, retry_failed: bool = RetryOpt,
    wait: bool = WaitOpt, wait_timeout: Optional[float] = WaitTimeoutOpt,
    num_gpus: Optional[float] = typer.Option(None, help="GPUs per actor where CUDA exists."),
) -> dict:
    """CLIP dense pixel embeddings (clip-i) and CLIP segment embeddings for every image, into the cache."""
    cfg = opts.build_config(address=address, batch_size=batch_size, extra=sets("ray", {"num_gpus": num_gpus}))
    return run_stage_command("clip_features", cfg, opts, max_failures=max_failures, retry_failed=retry_failed,
                             wait=wait, wait_timeout=wait_timeout)


@app.command("prototypes")
@common_options("precompute prototypes", stage="prototypes")
def prototypes(
    opts: Common,
    seed: Optional[int] = typer.Option(None, help="Seed of the unknown prototypes' sampling."),
    wait: bool = WaitOpt, wait_timeout: Optional[float] = WaitTimeoutOpt,
) -> dict:
    """Known-class prototypes (top-m CLIP segments per class text, FAISS) and unknown prototypes, from the images
    the config selects (rebuilt when their upstream content changes)."""
    cfg = opts.build_config(extra=sets("prototypes", {"seed": seed}))
    return run_stage_command("prototypes", cfg, opts, wait=wait, wait_timeout=wait_timeout)
