"""``clips4 demo``: every stage that exists, on a small sample set, offline, printing where outputs are.

The sample images come from scikit-image's bundled data at run time (nothing is copied into the repo).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console

console = Console()

#: scikit-image sample images used by the demo (all ship with the wheel; no download)
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry", "motorcycle_left")


def write_samples(folder: Path) -> list[Path]:
    """Write the skimage sample images as PNGs into ``folder`` (odd modes kept: camera/coins are greyscale)."""
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


def run_demo(out: Path, *, num_workers: int = 2, executor: str = "ray") -> int:
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
    cfg = load_config(None, None, [f"cache_root={cache}", "dataset.kind=folder", f"dataset.root={images}",
                                   f"ray.executor={executor}", f"ray.num_workers={num_workers}", "ray.batch_size=2"],
                      search=False)
    console.rule("1. precompute segments (contours → OWT-UCM → superpixels)")
    run = run_stage(cfg, "segments")
    code = print_summary(run)
    if code:
        return code
    _save_segment_previews(run.url, out / "previews")
    console.rule("outputs")
    for o in list_stage_outputs(str(cache)):
        console.print(f"  {o['stage']:<14} {o['state']:<10} {o['images']:>3} images  {o['url']}")
    console.print(f"  previews       {out / 'previews'}")
    console.print(f"[green]demo finished in {time.perf_counter() - t0:.0f} s[/]; outputs under {out}")
    return 0


def _save_segment_previews(stage_url: str, folder: Path) -> None:
    """Superpixel boundaries drawn over each image, so a person can look at what the stage produced."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from clips4.pipeline.cache import StageReader
    from clips4.pipeline.images import load_rgb

    folder.mkdir(parents=True, exist_ok=True)
    r = StageReader(stage_url)
    for image_id in r.image_ids:
        img = load_rgb(r.row(image_id)["path"]).copy()
        labels = r.get(image_id, "labels")
        img[find_boundaries(labels, mode="inner")] = (255, 255, 0)
        Image.fromarray(img).save(folder / f"{image_id}_segments.png")
