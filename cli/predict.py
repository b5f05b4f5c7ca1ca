"""``clips4 predict`` (segment any images with class names) and ``clips4 search`` (find cached segments by text)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clips4.cli.common import CLIError, Common, common_options, console, err_console, option


@common_options("predict", stage="clip_features")
def predict(
    opts: Common,
    images: Optional[List[Path]] = typer.Argument(None, help="Image files (any format the segments stage reads); with --root, the dataset's images are added."),
    classes: str = option("classes", ..., help="Class names: 'sky,tree,moon', a bundled list (voc21, context59, cocostuff171) or a text file."),
    model: str = option("model", help="'teacher': the configured CLIP backend run on each image; or a trained run: its folder (runs/NAME), its name or a final.pt."),
    checkpoint: Optional[Path] = option("checkpoint"),
    out: Path = option("out", Path("predictions"), help="Folder for <stem>_labels.png, <stem>_overlay.png, <stem>_areas.json."),
    alpha: float = typer.Option(0.5, "--alpha", help="Opacity of the class colours in the overlay."),
    device: str = option("device"),
) -> dict:
    """Segment images with free-form class names: label PNG, colour overlay with a legend, class areas (JSON).

    Exit status 1 when any image failed (the others are still written)."""
    from clips4.evaluate.predict import predict_images
    from clips4.evaluate.sources import parse_class_list

    cfg = opts.build_config()
    paths = [str(p) for p in images or []]
    if opts.root:  # only an explicit --root: a config's dataset is not a request to segment all of it
        from clips4.pipeline.stage import dataset_from_config

        paths += [r.path for r in dataset_from_config(cfg).records()]
    if not paths:
        raise CLIError("no images: give image files, or --root (and --dataset) for a dataset's images")
    try:
        names = parse_class_list(classes)
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None

    def show(path, r, err):
        if err:
            err_console.print(f"error: {err}", markup=False)
        elif not opts.quiet:
            top = ", ".join(f"{n} {100 * a['fraction']:.0f}%" for n, a in list(r["areas"].items())[:4])
            console.print(f"{path} → {r['overlay']} ({top})", markup=False)

    res = predict_images(cfg, paths, names, out, model=str(checkpoint) if checkpoint else model, device=device,
                         alpha=alpha, on_result=show)
    console.print(f"{len(res['written'])} image(s) written to {out}, {len(res['failed'])} failed")
    return {"out": str(out), "written": res["written"], "failed": res["failed"], "exit_code": 1 if res["failed"] else 0}


@common_options("search", stage="clip_features")
def search(
    opts: Common,
    query: str = typer.Argument(..., help="Text to look for, e.g. 'a photo of the moon'."),
    top: int = typer.Option(16, "--top", help="Number of segments to return."),
    out: Path = option("out", Path("search.png"), help="Contact sheet PNG to write."),
    templates: bool = typer.Option(False, "--templates", help="Average the query over the 85 prompt templates (for bare class names)."),
) -> dict:
    """Find the cached CLIP segments closest to a text (FAISS over all segment embeddings) and draw a contact sheet."""
    from rich.table import Table

    from clips4.evaluate.search import search_segments

    cfg = opts.build_config()
    hits = search_segments(cfg, query, top=top, templates=templates, out=out)
    table = Table(title=f"top {len(hits)} segments for {query!r}")
    for col in ("rank", "score", "image", "segment"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), f"{h['score']:.3f}", h["image_id"], str(h["segment_id"]))
    console.print(table)
    console.print(f"contact sheet: {out}")
    return {"out": str(out), "hits": hits}
