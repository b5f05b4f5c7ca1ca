"""``clips4 train-contours``: train the learned contour detector on a BSDS-layout folder (see trainer/edges.py).

Mounted by the CLI like the other optional commands; all the logic is :func:`clips4.trainer.edges.train_edges`.
"""
from __future__ import annotations

from typing import Optional

import typer


def train_contours_command(
    root: Optional[str] = typer.Option(None, "--root", "-r", help="BSDS500-layout folder (images/<split>, groundTruth/<split>); default ../shared/data/BSDS500 beside the repo."),
    splits: str = typer.Option("train", help="Comma-separated splits to train on (BSDS convention: train, or train,val for the test figure)."),
    out: str = typer.Option("runs/contours", help="Output folder: checkpoint.pt, log.jsonl, edges.pt, edges.onnx."),
    iterations: int = typer.Option(3000, help="Training iterations."),
    batch: int = typer.Option(8, help="Crops per iteration."),
    crop: int = typer.Option(160, help="Crop size in pixels."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (AdamW, warm-up then cosine)."),
    width: int = typer.Option(8, help="Channels of the first stage (model size)."),
    seed: int = typer.Option(0, help="Seed: the sample of iteration i depends only on (seed, i)."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu or cuda."),
    checkpoint_every: int = typer.Option(100, help="Iterations between (atomic) checkpoints."),
    snapshot_every: int = typer.Option(0, help="Keep the weights every N iterations (training curve); 0 = none."),
    time_limit: float = typer.Option(0.0, help="Stop after this many seconds (checkpointed, resumable); 0 = none."),
    limit_images: int = typer.Option(0, help="Use only the first N images per split (quick runs); 0 = all."),
    restart: bool = typer.Option(False, "--restart", help="Ignore an existing checkpoint in --out."),
) -> None:
    """Train the learned contour detector (EdgeNet) from scratch on BSDS; resumes from --out by default."""
    from clips4.evaluate.boundaries import _default_root
    from clips4.trainer.edges import EdgeTrainError, EdgeTrainParams, train_edges

    sp = tuple(s.strip() for s in splits.split(",") if s.strip())
    if not sp:
        raise typer.BadParameter("--splits must name at least one split", param_hint="--splits")
    p = EdgeTrainParams(root=root or str(_default_root()), splits=sp, out=out, iterations=iterations, batch=batch,
                        crop=crop, lr=lr, width=width, seed=seed, threads=threads, device=device,
                        checkpoint_every=checkpoint_every, snapshot_every=snapshot_every, time_limit_s=time_limit,
                        limit_images=limit_images)
    try:
        res = train_edges(p, resume=not restart)
    except EdgeTrainError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"trained {res['iterations']} iterations in {res['seconds']} s; ONNX: {res['onnx']}")
