"""``clips4 precompute segments | clip-features | prototypes``: run a pipeline stage into the cache."""
from __future__ import annotations

from typing import Optional

from clips4.cli.common import Common, common_options, option

#: how the per-image stages fan out: options that set a ray key
RUNNER = {"ray.address": "address", "ray.batch_size": "batch_size"}


def run_stage_command(name: str, cfg, opts: Common, *, max_failures: int = 0, retry_failed: bool = False,
                      wait: bool = False, wait_timeout: float | None = None) -> dict:
    """Run one stage, print its summary, return the ``--json`` summary (with ``exit_code``)."""
    from clips4.pipeline.stage import print_summary, run_stage

    run = run_stage(cfg, name, retry_failed=retry_failed, show_progress=not opts.quiet, wait=wait,
                    wait_timeout=wait_timeout)
    code = print_summary(run, max_failures)
    return {**run.to_dict(), "exit_code": code}


@common_options("precompute segments", stage="segments", settings=RUNNER)
def segments(
    opts: Common,
    max_failures: int = option("max_failures"), retry_failed: bool = option("retry_failed"),
    wait: bool = option("wait"), wait_timeout: Optional[float] = option("wait_timeout"),
) -> dict:
    """Contours → oriented watershed → UCM → superpixels for every image, into the segments cache."""
    cfg = opts.build_config()
    return run_stage_command("segments", cfg, opts, max_failures=max_failures, retry_failed=retry_failed, wait=wait,
                             wait_timeout=wait_timeout)


@common_options("precompute clip-features", stage="clip_features", settings={**RUNNER, "ray.num_gpus": "num_gpus"})
def clip_features(
    opts: Common,
    max_failures: int = option("max_failures"), retry_failed: bool = option("retry_failed"),
    wait: bool = option("wait"), wait_timeout: Optional[float] = option("wait_timeout"),
) -> dict:
    """CLIP dense pixel embeddings (clip-i) and CLIP segment embeddings for every image, into the cache."""
    cfg = opts.build_config()
    return run_stage_command("clip_features", cfg, opts, max_failures=max_failures, retry_failed=retry_failed,
                             wait=wait, wait_timeout=wait_timeout)


@common_options("precompute prototypes", stage="prototypes",
                settings={"prototypes.seed": option("seed", None, help="Seed of the unknown prototypes' sampling.")})
def prototypes(
    opts: Common,
    wait: bool = option("wait"), wait_timeout: Optional[float] = option("wait_timeout"),
) -> dict:
    """Known-class prototypes (top-m CLIP segments per class text, FAISS) and unknown prototypes, from the images
    the config selects (rebuilt when their upstream content changes)."""
    cfg = opts.build_config()
    return run_stage_command("prototypes", cfg, opts, wait=wait, wait_timeout=wait_timeout)
