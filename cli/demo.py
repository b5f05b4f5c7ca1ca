"""``clips4 demo``: every stage that exists, on a small sample set, offline, printing where outputs are.

The sample images come from scikit-image's bundled data at run time (nothing is copied into the repo).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from clips4.cli.common import Common, common_options, console, option

#: scikit-image sample images used by the demo (all ship with the wheel; no download)
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "motorcycle_left")


def write_samples(folder: Path) -> list[Path]:
    """Write the skimage sample images as PNGs into ``folder`` (odd modes kept: camera/coins are greyscale)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLES:
        fn = getattr(skdata, name, None)
        if fn is None:
            continue
        try:
            img = fn()
        except Exception:  # noqa: BLE001 - a sample that needs pooch (a download) is skipped offline
            continue
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(1e-9, float(img.max() - img.min()))).astype(np.uint8)
        p = folder / f"{name}.png"
        if not p.exists():
            Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def run_demo(out: Path, *, num_workers: int = 2, executor: str = "auto", iterations: int = 300,
             clip_checkpoint: str | None = None) -> int:
    from clips4.pipeline.cache import list_stage_outputs
    from clips4.pipeline.config import load_config
    from clips4.pipeline.stage import print_summary, run_stage

    t0 = time.perf_counter()
    out = out.resolve()
    images = out / "images"
    paths = write_samples(images)
    console.rule("[bold]clips4 demo")
    console.print(f"{len(paths)} sample images from scikit-image → {images}")
    cache = out / "cache"
    base = [f"cache_root={cache}", "dataset.kind=folder", f"dataset.root={images}", f"ray.executor={executor}",
            f"ray.num_workers={num_workers}", "ray.batch_size=2"]
    if clip_checkpoint:
        base.append(f"clip_features.clip.checkpoint={clip_checkpoint}")
    cfg = load_config(None, None, base, search=False)
    console.rule("1. precompute segments on the sample images (contours → OWT-UCM → superpixels)")
    run = run_stage(cfg, "segments")
    if print_summary(run):
        return 1
    _save_segment_previews(run.url, out / "previews")

    console.rule("2. CLIP dense features + prototypes on the sample images (needs real CLIP weights)")
    if not _real_clip_stages(cfg):
        console.print("[yellow]skipped[/]: the stages ran only where weights exist; the synthetic world below shows the method")

    console.rule("3. the synthetic world: segments → clip-features (synthetic teacher) → prototypes → train → evaluate")
    code = _synthetic_world(out / "synthetic-world", iterations)

    console.rule("outputs")
    for o in list_stage_outputs(str(cache)) + list_stage_outputs(str(out / "synthetic-world" / "cache")):
        unit = "images" if o["stage"] in ("segments", "clip_features") else "outputs"
        console.print(f"  {o['stage']:<14} {o['state']:<10} {o['images']:>3} {unit:<7} {o['url']}")
    console.print(f"  previews       {out / 'previews'}")
    console.print(f"  reports        {out / 'synthetic-world' / 'reports'}")
    console.print(f"[green]demo finished in {time.perf_counter() - t0:.0f} s[/]; outputs under {out}")
    return code


def _real_clip_stages(cfg) -> bool:
    """clip-features + prototypes on the samples with the configured CLIP, when its weights can be found."""
    from clips4.pipeline.clip.weights import WeightsNotFoundError
    from clips4.pipeline.processors import clip_features_preflight
    from clips4.pipeline.stage import print_summary, run_stage

    try:
        clip_features_preflight(cfg.params("clip_features"))
    except (WeightsNotFoundError, FileNotFoundError, ValueError) as exc:
        console.print(f"[bold yellow]CLIP weights not available here[/]: {str(exc).splitlines()[0]}")
        console.print("  (give them with `clips4 demo --clip-checkpoint PATH`, or run once with network access)")
        return False
    for stage in ("clip_features", "prototypes"):
        if print_summary(run_stage(cfg, stage)):
            return False
    return True


def _synthetic_world(root: Path, iterations: int) -> int:
    """The method end to end where the truth is known; prints teacher vs student mIoU on held-out images."""
    from importlib import resources

    import yaml

    from clips4.evaluate.language import run_language
    from clips4.pipeline.config import load_config
    from clips4.pipeline.stage import dataset_from_config, print_summary, run_stage
    from clips4.synthetic import SyntheticWorld
    from clips4.trainer.train import train

    spec = yaml.safe_load(resources.files("clips4.data").joinpath("configs", "synthetic.yaml").read_text())
    bp = spec["stages"]["clip_features"]["params"]["clip"]["backend_params"]
    world = SyntheticWorld(n_classes=bp["n_classes"], image_size=tuple(bp["image_size"]), seed=bp["world_seed"])
    if not (root / "classes.txt").exists():
        world.write(root, n_train=64, n_val=16)
    cfg_file = root / "synthetic.yaml"
    spec["cache_root"] = str(root / "cache")
    spec["runs_root"] = str(root / "runs")  # the finished run is published as <world>/runs/train
    spec["dataset"]["root"] = str(root)
    spec["stages"]["prototypes"]["params"]["classes"] = str(root / "classes.txt")
    spec["stages"]["train"]["params"]["iterations"] = iterations
    cfg_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    console.print(f"world: {root} ({', '.join(world.class_names)}); config: {cfg_file}")
    results = {}
    for split in ("train", "val"):
        cfg = load_config(None, [cfg_file], [f"dataset.split={split}"], search=False)
        for stage in ("segments", "clip_features") + (("prototypes",) if split == "train" else ()):
            if print_summary(run_stage(cfg, stage, show_progress=False)):
                return 1
    cfg = load_config(None, [cfg_file], [], search=False)
    res = train(cfg, resume=True)
    val = load_config(None, [cfg_file], ["dataset.split=val"], search=False)
    ds = dataset_from_config(val)
    run = res.published or res.out
    console.print(f"trained run: {run} (Segmenter('{run}'), clips4 predict --model {run})", markup=False)
    for name, model in (("teacher", "teacher"), ("student", str(run))):
        results[name] = run_language(val, ds, model=model, out=root / "reports" / name)["miou"]
    gain = 100 * (results["student"] - results["teacher"])
    console.print(f"[bold]held-out mIoU[/]: teacher (CLIP-like dense features) {100 * results['teacher']:.1f}  →  "
                  f"CLIP-S4 student {100 * results['student']:.1f}  ({gain:+.1f} points)")
    return 0


def _save_segment_previews(stage_url: str, folder: Path) -> None:
    """Superpixel boundaries drawn over each image, so a person can look at what the stage produced."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from clips4.pipeline.cache import StageReader
    from clips4.pipeline.images import load_rgb
    from clips4.pipeline.safepath import output_path

    folder.mkdir(parents=True, exist_ok=True)
    r = StageReader(stage_url)
    for image_id in r.image_ids:
        img = load_rgb(r.row(image_id)["path"]).copy()
        labels = r.get(image_id, "labels")
        img[find_boundaries(labels, mode="inner")] = (255, 255, 0)
        Image.fromarray(img).save(output_path(folder, f"{image_id}_segments.png", what="preview"))


@common_options("demo", dataset=None)
def demo(
    opts: Common,
    out: Path = option("out", Path("outputs/demo"), help="Folder for the demo's images, caches and pictures."),
    num_workers: int = option("num_workers", 2, help="Ray workers."),
    executor: str = option("executor", "auto", help="'auto' (this process for the few sample images), 'ray' or 'local'."),
    iterations: int = option("iterations", 300, help="Training iterations of the synthetic-world run."),
    clip_checkpoint: Optional[str] = option("clip_checkpoint", help="Real CLIP weights (ViT-B-16) to run the CLIP stages on the samples."),
) -> dict:
    """Run every stage on sample images and a synthetic world, offline, and print where outputs are."""
    code = run_demo(out, num_workers=num_workers, executor=executor, iterations=iterations, clip_checkpoint=clip_checkpoint)
    return {"out": str(out), "exit_code": code}
