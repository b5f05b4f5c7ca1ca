"""``clips4 evaluate language | unsupervised | avgsim | class-free | davis | boundaries``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clips4.cli.common import CLIError, Common, common_options, console, option

VOC_MODE_HELP = ("VOC convention (only for --dataset voc without --classes): 21 = background + 20 objects, a "
                 "'background' prompt competes like any class (MaskCLIP/mmseg); 20 = the 20 object classes only, GT "
                 "background pixels are ignored and saved predictions keep VOC ids 1..20.")


def _model(model: str, checkpoint: Optional[Path]) -> str:
    return str(checkpoint) if checkpoint is not None else model


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def print_metrics(res: dict, title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("mIoU", "pAcc", "mAcc", "classes evaluated", "images"):
        t.add_column(col, justify="right")
    t.add_row(_pct(res.get("miou")), _pct(res.get("pixel_accuracy")), _pct(res.get("mean_accuracy")),
              f"{res.get('num_classes_evaluated')}/{res.get('num_classes')}", str(res.get("n_images")))
    console.print(t)
    pc = Table(title="per-class IoU (%)")
    pc.add_column("class")
    pc.add_column("IoU", justify="right")
    for name, v in (res.get("per_class_iou") or {}).items():
        pc.add_row(name, _pct(v))
    console.print(pc)


def _value_errors(fn, *args, **kwargs):
    """Run an evaluation; its ValueErrors are the user's input mistakes (exit 2, no traceback)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


@common_options("evaluate language", stage="clip_features")
def language(
    opts: Common,
    model: str = option("model"), checkpoint: Optional[Path] = option("checkpoint"),
    classes: Optional[str] = option("classes", help="Class names in GT id order: voc21, context59, a file or 'a,b,c' (default: the dataset's)."),
    voc_mode: int = typer.Option(21, "--voc-mode", help=VOC_MODE_HELP),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="Write predicted label PNGs (dataset ids) into this folder."),
    out: Path = option("out", Path("runs/language"), help="Report folder: results.json, report.md, PNG figures."),
    overlays: int = typer.Option(4, "--overlays", help="Number of image | prediction | GT figures in the report."),
    device: str = option("device"), precompute_: bool = option("precompute"),
    prior_matching: str = typer.Option("checkpoint", "--calibration", "--prior-matching", help="The class calibration (train.calibration: a per-class bias that keeps a class its teacher mostly confuses from vanishing): 'checkpoint' applies the one `clips4 train` stored in the run when the evaluated classes are the calibrated ones; 'none' = plain arg-max; a split of the dataset (e.g. train) fits it again on that split's cached teacher features (no labels)."),
    prior_images: int = typer.Option(512, "--calibration-images", "--prior-images", help="With --calibration SPLIT: how many of that split's images (train.calibration_images)."),
    prior_mode: str = typer.Option("band", "--calibration-mode", "--prior-mode", help="With --calibration SPLIT, as train.calibration (default band): 'raise' only the classes the model predicts at under --calibration-ratio x the teacher's frequency, 'band' (raise those, and lower the classes it predicts at over the teacher's frequency / --calibration-ratio), or 'match' every class's frequency to the teacher's."),
    prior_collapse_ratio: Optional[float] = typer.Option(None, "--calibration-ratio", "--prior-collapse-ratio", help="With --calibration SPLIT and mode raise or band: the trigger in (0, 1], as train.calibration_ratio (default: its default)."),
    prior_guard: bool = typer.Option(True, "--calibration-guard/--no-calibration-guard", help="With --calibration SPLIT, as train.calibration_guard: keep only the fraction (0, 1/4 .. 1) of the refitted bias that agrees best with the teacher's labels on those images."),
) -> dict:
    """Language-driven segmentation (paper 4.3): each pixel takes the class whose text embedding is closest.

    Prints mIoU, pixel accuracy and per-class IoU; writes the report (JSON with numbers, config and
    fingerprints, Markdown table, figures) into --out."""
    from clips4.trainer.config import FIT_MODES  # torch-free: a usage error does not pay for importing torch

    if prior_mode not in FIT_MODES:
        raise CLIError(f"--calibration-mode (--prior-mode) must be one of {', '.join(FIT_MODES)}, got {prior_mode!r}")
    if prior_collapse_ratio is not None and not 0 < prior_collapse_ratio <= 1:
        raise CLIError(f"--calibration-ratio (--prior-collapse-ratio) must be in (0, 1], got {prior_collapse_ratio}")
    from clips4.evaluate.language import run_language
    from clips4.evaluate.sources import precompute
    from clips4.pipeline.stage import dataset_from_config

    cfg = opts.build_config()
    ds = dataset_from_config(cfg)
    m = _model(model, checkpoint)
    if precompute_ and m == "teacher":
        precompute(cfg, ["clip_features"], show_progress=not opts.quiet)
    res = _value_errors(run_language, cfg, ds, model=m, classes=classes, voc_mode=voc_mode,
                        save_predictions=save_predictions, out=out, device=device, overlays=overlays,
                        prior_matching=prior_matching, prior_images=prior_images, prior_mode=prior_mode,
                        prior_collapse_ratio=prior_collapse_ratio, prior_guard=prior_guard)
    print_metrics(res, f"language-driven segmentation — {res['model']} on {ds.key}"
                  + (f" (VOC {voc_mode})" if ds.kind == "voc" and not classes else ""))
    pm = res.get("prior_matching")
    if pm and pm.get("applied") is False:
        console.print(f"class calibration: not applied ({pm['why']})", markup=False)
    elif pm:
        mode = pm.get("mode", "match")
        what = ("student frequencies matched to the teacher's" if mode == "match" else
                f"classes predicted at under {pm['collapse_ratio']:g} x the teacher's frequency raised towards it"
                if mode == "raise" else
                f"classes predicted outside {pm['collapse_ratio']:g} .. 1/{pm['collapse_ratio']:g} x the teacher's "
                "frequency moved towards it")
        where = ("stored in the checkpoint" if pm.get("source") == "checkpoint" else
                 f"fitted on {pm['n_images']} '{pm['split']}' images")
        from clips4.trainer.calibration import guard_summary  # torch is loaded by now (the evaluation ran)

        raised = [f"{n} {b:+.3f}" for n, b in zip(pm["classes"], pm["bias"]) if abs(b) > 1e-6]
        console.print(f"class calibration {where} ({what}): {', '.join(raised) or 'every bias 0'}{guard_summary(pm)}; "
                      "in results.json", markup=False)
        if pm.get("capped"):
            console.print(f"warning: class calibration: {', '.join(pm['capped'])} held at the cap "
                          "(train.calibration_max_margins): the network hardly ranks them above their look-alikes",
                          markup=False)
    elif prior_matching not in ("none", "checkpoint"):
        console.print("prior matching: not applied to the teacher (it is the reference the student is matched to)",
                      markup=False)
    console.print(f"report: {out}/report.md, {out}/results.json")
    return {"out": str(out), "miou": res.get("miou"), "pixel_accuracy": res.get("pixel_accuracy"),
            "n_images": res.get("n_images"), "per_class_iou": res.get("per_class_iou"), "model": res.get("model"),
            "prior_matching": res.get("prior_matching")}


@common_options("evaluate unsupervised", stage="clip_features")
def unsupervised(
    opts: Common,
    train_split: str = option("train_split", "train", help="Split whose GT labels the k-NN database and trains the linear classifier."),
    model: str = option("model"), checkpoint: Optional[Path] = option("checkpoint"),
    segments: str = option("segments", "ucm", help="Segments for k-NN: 'ucm' (the cached superpixels of the segments stage) or 'kmeans' (per-image k-means over the embeddings)."),
    n_clusters: Optional[int] = typer.Option(None, "--n-clusters", help="k-means segments per image (default: clip_features.n_clusters)."),
    k: int = typer.Option(10, "-k", "--k", help="Nearest training segments that vote."),
    pixels_per_image: int = typer.Option(2000, "--pixels-per-image", help="Labelled pixels sampled per training image for the linear classifier."),
    epochs: int = typer.Option(10, "--epochs", help="Linear classifier epochs."),
    lr: float = option("lr", 0.1, help="Linear classifier learning rate (AdamW)."),
    seed: int = option("seed", 0, help="Seed of the pixel sampling and the classifier."),
    out: Path = option("out", Path("runs/unsupervised"), help="Report folder."),
    device: str = option("device"), precompute_: bool = option("precompute"),
) -> dict:
    """Unsupervised segmentation read-outs (paper 4.4): k-NN segment classification and a linear classifier on
    frozen pixel embeddings; mIoU for both. --split is the evaluation split."""
    from rich.table import Table

    from clips4.evaluate.sources import precompute, with_split
    from clips4.evaluate.unsupervised import run_unsupervised
    from clips4.pipeline.stage import dataset_from_config

    cfg = opts.build_config()
    m = _model(model, checkpoint)
    eval_ds, train_ds = dataset_from_config(cfg), dataset_from_config(with_split(cfg, train_split))
    if precompute_:
        need = (["segments"] if segments == "ucm" else []) + (["clip_features"] if m == "teacher" else [])
        for c in (with_split(cfg, train_split), cfg):
            precompute(c, need, show_progress=not opts.quiet)
    res = _value_errors(run_unsupervised, cfg, train_ds, eval_ds, model=m, segments=segments, k=k,
                        n_clusters=n_clusters, pixels_per_image=pixels_per_image, epochs=epochs, lr=lr, seed=seed,
                        device=device, out=out, progress=console.print)
    t = Table(title=f"unsupervised segmentation — {res['model']} ({train_ds.split} → {eval_ds.split})")
    for col in ("read-out", "mIoU", "pAcc", "images"):
        t.add_column(col, justify="right")
    for name, key in (("k-NN", "knn"), ("linear", "linear")):
        r = res[key]
        t.add_row(name + (f" (k={k}, {segments} segments)" if key == "knn" else ""), _pct(r["miou"]),
                  _pct(r["pixel_accuracy"]), str(r["n_images"]))
    console.print(t)
    if res.get("note"):
        console.print(f"note: {res['note']}")
    console.print(f"report: {out}/report.md")
    return {"out": str(out), "knn_miou": res["knn_miou"], "linear_miou": res["linear_miou"], "model": res["model"]}


@common_options("evaluate avgsim", stage="clip_features")
def avgsim(
    opts: Common,
    checkpoint: Path = option("checkpoint", ..., help="The trained model (final.pt) to compare with CLIP."),
    segments: str = option("segments", "clip", help="'clip': the cached CLIP segments of clip_features; 'ucm': the cached superpixels."),
    out: Path = option("out", Path("runs/avgsim"), help="Report folder."),
    device: str = option("device"),
) -> dict:
    """avgsim (paper 4.6, Tab. 6): mean cosine similarity between the model's and CLIP's segment embeddings over
    the cached segments, with the number of segments."""
    from clips4.evaluate.avgsim import run_avgsim
    from clips4.pipeline.stage import dataset_from_config

    cfg = opts.build_config()
    res = _value_errors(run_avgsim, cfg, dataset_from_config(cfg), checkpoint, segments=segments, device=device, out=out)
    console.print(f"avgsim = {res['avgsim']:.4f} (std {res['avgsim_std']:.4f}) over {res['n_segments']} segments "
                  f"in {res['n_images']} images ({segments} segments) — {res['model']}")
    console.print(f"report: {out}/report.md")
    return {k: res[k] for k in ("avgsim", "avgsim_std", "n_segments", "n_images", "model")} | {"out": str(out)}


@common_options("evaluate class-free", stage="clip_features")
def class_free(
    opts: Common,
    train_split: Optional[str] = option("train_split", help="Split the prototypes and models are trained on (default: the config's dataset.split); --split is the evaluated split (default val)."),
    folds: int = typer.Option(4, "--folds", help="Number of folds (paper: 4 over the 59 Pascal-Context classes, stored split)."),
    fold: Optional[List[int]] = typer.Option(None, "--fold", help="Only run these folds (repeatable; default all)."),
    fold_seed: int = typer.Option(0, "--fold-seed", help="Seed of the fold split for class sets other than the stored Context-59 one."),
    seeds: int = typer.Option(5, "--seeds", help="Training runs per fold (seeds first-seed..first-seed+N-1; paper: 5)."),
    first_seed: int = typer.Option(0, "--first-seed", help="First seed (prototypes.seed = train.seed = seed)."),
    iterations: Optional[int] = option("iterations", help="Training iterations per run (default: train.iterations)."),
    checkpoints: Optional[List[Path]] = typer.Option(None, "--checkpoints", help="Evaluate these trained checkpoints instead of training (repeatable); each one's known classes pick its fold."),
    classes: Optional[str] = option("classes", help="All classes in GT id order (default: the dataset's class names)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also evaluate the teacher (cached CLIP features) on the same folds."),
    precompute_: bool = option("precompute", True, help="Run the segments/clip_features stages first (cached images are skipped)."),
    out: Path = option("out", Path("runs/class-free"), help="Report folder (and the known-class files)."),
    device: str = option("device"),
) -> dict:
    """Class-free segmentation (paper Tab. 3): per fold, its classes are unknown (left out of the known
    prototypes); train with several seeds, evaluate on all classes: mIoU_u, mIoU_k and hIoU, mean ± std."""
    from clips4.evaluate.classfree import print_results, run_class_free

    eval_split = opts.split or "val"
    cfg = opts.build_config(split=train_split)
    res = _value_errors(run_class_free, cfg, n_folds=folds, fold_seed=fold_seed, only_folds=fold or None,
                        seeds=list(range(first_seed, first_seed + seeds)), iterations=iterations,
                        checkpoints=checkpoints or [], eval_split=eval_split, classes=classes, baseline=baseline,
                        precompute_stages=precompute_, device=device, out=out, progress=console.print)
    print_results(console, res)
    console.print(f"report: {out}/report.md, {out}/results.json")
    return {"out": str(out), **{k: res.get(k) for k in ("miou_unknown", "miou_known", "hiou")}}


@common_options("evaluate davis")
def davis(
    opts: Common,
    embedding: str = typer.Option("color", help="Embedding source: 'color' (Lab + xy baseline) or 'checkpoint' (a trained model; needs --checkpoint)."),
    checkpoint: Optional[Path] = option("checkpoint", help="Model checkpoint for --embedding checkpoint."),
    out: Path = option("out", Path("runs/davis"), help="Output folder: <out>/<sequence>/<frame>.png palette masks, per-sequence JSON and davis_results.json."),
    context: int = typer.Option(20, help="Number of preceding frames used as context (the first frame is always added)."),
    radius: float = typer.Option(12.0, help="Spatial radius on the feature grid for preceding-frame neighbours (distance < radius)."),
    topk: int = typer.Option(10, help="Number of most similar context nodes whose labels are averaged."),
    temperature: float = typer.Option(0.07, help="Softmax temperature applied to the cosine affinities."),
    sequences: Optional[List[str]] = typer.Option(None, help="Sequences to run (repeat or comma-separate); default: ImageSets/2017/<split>.txt."),
    limit_frames: Optional[int] = typer.Option(None, help="Only propagate/score the first N frames of each sequence (quick checks; N >= 3)."),
    device: Optional[str] = option("device", None, help="Torch device (default: cuda if available, else cpu)."),
) -> dict:
    """Propagate DAVIS 2017 first-frame masks with pixel embeddings and report J, F and J&F (paper 4.5).
    Sequences finished by an earlier run with the same settings are not redone."""
    from rich.table import Table

    from clips4.evaluate.davis import run_davis

    cfg = opts.build_config(dataset="davis")
    if not cfg.dataset.root:
        raise CLIError("--root is required (a DAVIS 2017 folder with JPEGImages/, Annotations/, ImageSets/)")
    seqs = [s for item in (sequences or []) for s in item.split(",") if s] or None
    res = _value_errors(run_davis, cfg.dataset.root, out, embedding=embedding, checkpoint=checkpoint, sequences=seqs,
                        split=cfg.dataset.split or "val", n_context=context, radius=radius, topk=topk,
                        temperature=temperature, limit_frames=limit_frames, device=device, progress=console.print)
    table = Table(title=f"DAVIS 2017 propagation ({embedding})")
    for col in ("Sequence", "objects", "J", "F", "J&F"):
        table.add_column(col, justify="right" if col != "Sequence" else "left")
    for name, r in res["sequences"].items():
        table.add_row(name, str(r["n_objects"]), f"{r['J']:.3f}", f"{r['F']:.3f}", f"{r['J&F']:.3f}")
    g = res["global"]
    table.add_row("mean (over objects)", str(g["n_objects"]), f"{g['J-Mean']:.3f}", f"{g['F-Mean']:.3f}",
                  f"{g['J&F-Mean']:.3f}")
    console.print(table)
    console.print(f"masks + JSON written to {out} (davis_results.json)")
    return {"out": str(out), **{k: g[k] for k in ("J&F-Mean", "J-Mean", "F-Mean", "n_objects")},
            "frames_without_annotation": res["frames_without_annotation"]}


@common_options("evaluate boundaries", stage="segments")
def boundaries(
    opts: Common,
    thresholds: int = typer.Option(99, help="Number of evenly spaced thresholds (BSDS uses 99; fewer for a quick look)."),
    workers: int = option("workers", 2, help="Workers for the boundary matching (~0.1 s per threshold per annotator): Ray workers with --executor ray (default), processes with --executor local."),
    out: Optional[Path] = option("out", help="Folder for boundaries.json, the PR-curve PNG and the per-image counts (reruns score only missing images)."),
) -> dict:
    """Score the segments stage on BSDS500 (--root, --split test|val|train; default test): contour map (after NMS)
    and UCM boundary P/R/F at ODS and OIS, AP, and segmentation covering. Runs the segments stage there first, or
    reuses its cache."""
    from clips4.evaluate.boundaries import evaluate_boundaries, segments_predictions
    from clips4.pipeline.stage import print_summary, run_stage

    if not opts.root:
        raise CLIError("--root is required: a BSDS500-layout folder (images/<split>, groundTruth/<split>)")
    split = opts.split or "test"
    cfg = opts.build_config(dataset="bsds", split=split)
    run = run_stage(cfg, "segments", show_progress=not opts.quiet)
    if print_summary(run, max_failures=-1):
        return {"exit_code": 1}
    predictions, image_ids = segments_predictions(run.url)
    summary = evaluate_boundaries(cfg.dataset.root, predictions, split=split, thresholds=thresholds, limit=opts.limit,
                                  detector=cfg.params("segments").detector, workers=workers, out_dir=out,
                                  image_ids=image_ids, quiet=opts.quiet,
                                  executor="ray" if cfg.ray.executor == "ray" else "process",
                                  ray_address=cfg.ray.address)
    return {"out": str(out) if out else None, "segments": run.url,
            **{k: {"ODS": v["ODS"]["f"], "OIS": v["OIS"]["f"], "AP": v["AP"]} for k, v in summary.items()
               if isinstance(v, dict) and "ODS" in v}}
