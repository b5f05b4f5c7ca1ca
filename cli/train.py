"""``clips4 train``: the pixel embedding network from the cached segments, CLIP features and prototypes."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clips4.cli.common import CLIError, Common, common_options, console, option


@common_options("train", stage="train", settings={"train.out": option("out", help="Train in this folder as it is (nothing is published); default: the cache, named by fingerprint, published as runs/NAME.")})
def train(
    opts: Common,
    resume: bool = typer.Option(False, "--resume", help="Continue a run from its last checkpoint; with --iterations N also lengthen or shorten a finished or unfinished run (the LR schedule follows the new length)."),
    restart: bool = option("restart"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this step (the run can be resumed)."),
    wait: bool = option("wait"), wait_timeout: Optional[float] = option("wait_timeout"),
) -> dict:
    """Train the pixel embedding network from the cached segments, CLIP features and prototypes of the images the
    config selects; a finished run is published as runs/NAME (train.name)."""
    cfg = opts.build_config()  # first: a usage error does not pay for importing torch (seconds)
    from clips4.pipeline.stage import dataset_from_config, open_stage

    dataset = dataset_from_config(cfg)
    for name in cfg.stage_deps("train"):  # a missing input is one too
        open_stage(cfg, name, dataset)
    from clips4.trainer.train import train as run_training

    res = run_training(cfg, dataset=dataset, resume=resume, restart=restart, max_steps=max_steps,
                       show_progress=not opts.quiet, wait=wait, wait_timeout=wait_timeout)
    summary = {"out": str(res.out), "run": str(res.published) if res.published else None, "step": res.step,
               "stopped": res.stopped, "last_loss": res.losses[-1] if getattr(res, "losses", None) else None}
    if res.stopped == "interrupted":  # last.pt holds the current step; 143 (SIGTERM) / 130 (SIGINT)
        summary["exit_code"] = 128 + int(res.signal)
    return summary


@common_options("train-contours", dataset=None)
def train_contours(
    opts: Common,
    root: str = option("root", ..., help="BSDS500-layout folder (images/<split>, groundTruth/<split>)."),
    splits: str = typer.Option("train", help="Comma-separated splits to train on (BSDS convention: train, or train,val for the test figure)."),
    out: str = option("out", "runs/contours", help="Output folder: checkpoint.pt, log.jsonl, edges.pt, edges.onnx."),
    iterations: int = option("iterations", 3000, help="Training iterations."),
    batch: int = typer.Option(8, help="Crops per iteration."),
    crop: int = typer.Option(160, help="Crop size in pixels."),
    lr: float = option("lr", 3e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
    width: int = option("width", 8, help="Channels of the first stage (model size)."),
    seed: int = option("seed", 0, help="Seed: the sample of iteration i depends only on (seed, i)."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    workers: int = option("workers", 0, help="Data-loader processes drawing the crops (0: in the training process; the samples are the same for any number)."),
    device: str = option("device", "auto", help="auto (CUDA when available), cpu or cuda."),
    checkpoint_every: int = typer.Option(100, help="Iterations between (atomic) checkpoints."),
    snapshot_every: int = typer.Option(0, help="Keep the weights every N iterations (training curve); 0 = none."),
    time_limit: float = typer.Option(0.0, help="Stop after this many seconds (checkpointed, resumable); 0 = none."),
    limit_images: int = typer.Option(0, help="Use only the first N images per split (quick runs); 0 = all."),
    restart: bool = option("restart", help="Ignore an existing checkpoint in --out."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from these EdgeNet weights (edges.pt of the same --width) instead of a random initialisation: fine-tuning. Ignored when resuming."),
    wait: bool = option("wait"), wait_timeout: Optional[float] = option("wait_timeout"),
) -> dict:
    """Train the learned contour detector (EdgeNet) from scratch on BSDS; resumes from --out by default. Writes
    --out/edges.onnx, which the segments stage uses with ``segments.detector_params: {path: FILE}``."""
    from clips4.trainer.edges import EdgeTrainError, EdgeTrainParams, train_edges

    sp = tuple(s.strip() for s in splits.split(",") if s.strip())
    if not sp:
        raise CLIError("--splits must name at least one split")
    p = EdgeTrainParams(root=root, splits=sp, out=out, iterations=iterations, batch=batch, crop=crop, lr=lr,
                        width=width, seed=seed, threads=threads, workers=workers, device=device, checkpoint_every=checkpoint_every,
                        snapshot_every=snapshot_every, time_limit_s=time_limit, limit_images=limit_images,
                        init=str(Path(init).resolve()) if init else None)
    try:
        res = train_edges(p, resume=not restart, wait=wait, wait_timeout=wait_timeout)
    except EdgeTrainError as exc:
        raise CLIError(str(exc)) from None
    console.print(f"trained {res['iterations']} iterations in {res['seconds']} s; ONNX: {res['onnx']}")
    return dict(res)
