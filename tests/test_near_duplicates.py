"""The student keeps two near-duplicate classes apart: a tiny world of two yellows that differ by a
few colour levels and their stripe frequency (plus one distinct class), a teacher reading blurred colour with
noise and a per-image nuisance direction; after a short training run each twin keeps its own IoU. The SimCLR
views imposed on the student — photometric (hue/saturation/brightness jitter, grayscale) and rescaled crops —
teach invariance to the very cues that separate the twins (colour levels, stripe frequency), so the paper-style
defaults of before collapse one of them."""
from __future__ import annotations

import os

import pytest

TWINS = {
    "world": {"specs": [
        {"name": "sky", "pattern": "flat", "fg": [120, 180, 230], "bg": [150, 200, 240], "period": 64.0},
        {"name": "straw", "pattern": "hstripes", "fg": [235, 205, 60], "bg": [170, 140, 30], "period": 3.0},
        {"name": "corn", "pattern": "hstripes", "fg": [222, 192, 48], "bg": [155, 128, 22], "period": 9.0},
    ], "region_shape": "voronoi"},
    "teacher": {"cues": "colour", "colour_blur": 3.0, "noise_patch_p": 0.1, "noise_sigma": 1.5, "nuisance": 0.5},
}
FLOOR = 0.30  # per-class IoU each twin must keep (paper views with hard targets: 0.03 and 0.23; hard targets, raise calibration: 0.39 / 0.56; the defaults: 0.45 / 0.63)


def _run(tmp_path, overrides: list[str]) -> dict:
    import torch
    from conftest import spec_world

    from clips4.evaluate.language import run_language
    from clips4.pipeline.stage import dataset_from_config
    from clips4.trainer.train import train

    torch.set_num_threads(1)
    world = spec_world(tmp_path, TWINS, (48, 64), 16, 6, {
        "train": {"iterations": 150, "batch_size": 4, "crop_size": 48, "num_workers": 0, "n_segments": 9,
                  "cache_images": 16, "checkpoint_every": 1000}},
        prototypes_sets=tuple(o for o in overrides if o.startswith("prototypes.")))
    sets = [f"train.out={tmp_path / 'run'}", *overrides]
    train(world.load(*sets, "dataset.split=train"), show_progress=False)
    vcfg = world.load(*sets, "dataset.split=val")
    res = run_language(vcfg, dataset_from_config(vcfg), model=str(tmp_path / "run" / "final.pt"), out=None)
    return res["per_class_iou"]


def test_student_keeps_near_duplicate_classes_apart(tmp_path):
    iou = _run(tmp_path, [])
    assert iou["straw"] >= FLOOR and iou["corn"] >= FLOOR, iou


@pytest.mark.skipif(not os.environ.get("CLIPS4_SLOW_TESTS"), reason="the paper views' failure, ~60 s more: "
                    "CLIPS4_SLOW_TESTS=1 pytest tests/test_near_duplicates.py")
def test_paper_views_with_hard_targets_collapse_a_twin(tmp_path):
    iou = _run(tmp_path, ["train.augment.photometric=imposed", "train.augment.channel_shuffle_p=0",
                          "train.augment.invert_p=0", "train.augment.geometric=imposed", "train.augment.zoom=null",
                          "train.augment.scale=[0.25,1.0]", "prototypes.unknown_pool=1.0",
                          # and their L_s: hard targets, no class calibration (with soft targets and band
                          # calibration the paper views keep both twins above the floor, 0.34 / 0.68)
                          "train.pseudo_labels=hard", "train.calibration=none"])
    assert min(iou["straw"], iou["corn"]) < FLOOR, iou
