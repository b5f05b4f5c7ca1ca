"""``clips4 train``: the pixel embedding network from the cached segments, CLIP features and prototypes."""
from __future__ import annotations

from typing import Optional

import typer

from clips4.cli.common import Common, common_options, sets


@common_options("train")
def train(
    opts: Common,
    resume: bool = typer.Option(False, "--resume", help="Continue a run from its last checkpoint; with --iterations N also lengthen or shorten a finished or unfinished run (the LR schedule follows the new length)."),
    restart: bool = typer.Option(False, "--restart", help="Start over, ignoring (and later replacing) checkpoints."),
    iterations: Optional[int] = typer.Option(None, help="Training iterations (paper: 20k VOC/Context, 80k COCO-Stuff)."),
    backbone: Optional[str] = typer.Option(None, help="resnet50 (paper), resnet18 or tiny."),
    backbone_weights: Optional[str] = typer.Option(None, help="imagenet, a local weights file, or 'random' (explicit)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: the cache, named by fingerprint)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this step (the run can be resumed)."),
) -> dict:
    """Train the pixel embedding network from the cached segments, CLIP features and prototypes."""
    from clips4.trainer.train import train as run_training

    extra = sets("train", {"iterations": iterations, "backbone": backbone, "backbone_weights": backbone_weights,
                           "out": out})
    cfg = opts.build_config(extra=extra)
    res = run_training(cfg, resume=resume, restart=restart, max_steps=max_steps, show_progress=not opts.quiet)
    summary = {"out": str(res.out), "step": res.step, "stopped": res.stopped,
               "last_loss": res.losses[-1] if getattr(res, "losses", None) else None}
    if res.stopped == "interrupted":  # last.pt holds the current step; 143 (SIGTERM) / 130 (SIGINT)
        summary["exit_code"] = 128 + int(res.signal)
    return summary
