"""The student learns what its teacher reads, not a cue the teacher ignores: a tiny world of three textures
(horizontal, vertical, diagonal stripes) whose brightness is tied to the class in the training images and shuffled
in the val images, with a teacher that reads texture only. Views transformed as a whole keep how bright the
regions of an image are relative to each other, so a student that sees RGB of one image at a time reads brightness
first and falls below its teacher on the val images; the defaults — the grey-level pattern with the local
brightness and contrast divided out (``train.input: local-contrast``, chosen by ``auto`` since the teacher is
measured to ignore each region's colour and brightness), and a box of another image pasted into each
(``train.augment.cutmix_p``) — pass it (docs/results.md, "Spurious cues")."""
from __future__ import annotations

import json


def _world() -> dict:
    from dataclasses import asdict

    from clips4.synthetic import spurious_specs

    # three textures (horizontal, vertical, diagonal stripes), each with its own brightness in train
    return {"world": {"specs": [asdict(s) for s in spurious_specs("luminance", 3, contrast=0.4, seed=7)],
                      "spurious_colour": True},
            "teacher": {"cues": "texture", "noise_patch_p": 0.2, "noise_sigma": 0.8}}


SIZE = (48, 64)


def _precompute(tmp_path):
    """The world's images, segments, CLIP features and prototypes under ``tmp_path`` (a ``BuiltWorld``)."""
    import torch
    from conftest import spec_world

    torch.set_num_threads(1)
    return spec_world(tmp_path, _world(), SIZE, 24, 8, {
        "prototypes": {"invariance_images": 16},
        "train": {"iterations": ITERATIONS, "batch_size": 3, "crop_size": 48, "num_workers": 0, "n_segments": 9,
                  "cache_images": 24, "checkpoint_every": 10000}})


def _run(tmp_path, world, overrides: list[str]) -> tuple[float, float]:
    """(teacher, student) val mIoU after a short training run on ``world`` (:func:`_precompute`) with ``overrides``."""
    from clips4.evaluate.language import run_language
    from clips4.pipeline.stage import dataset_from_config
    from clips4.trainer.train import train

    out = tmp_path / ("run-" + "-".join(o.replace("=", "_").replace(".", "_") for o in overrides))
    train(world.load(*overrides, f"train.out={out}", "dataset.split=train"), show_progress=False)
    vcfg = world.load(*overrides, "dataset.split=val")
    ds = dataset_from_config(vcfg)
    teacher = run_language(vcfg, ds, model="teacher", out=None)["miou"]
    return 100 * teacher, 100 * run_language(vcfg, ds, model=str(out / "final.pt"), out=None)["miou"]


#: at 400 iterations of batch 3 (with the calibration guard): teacher 59.6, the defaults 70.9, an RGB student of
#: unmixed images 48.8 (batch 4: 72.7 and 53.8; by 800 iterations the RGB student reaches its
#: teacher too: the shortcut is what it learns first)
ITERATIONS = 400


def test_student_reads_texture_not_the_luminance_tied_to_the_class(tmp_path):
    """The defaults (``train.input: auto``, resolved to ``local-contrast`` since the teacher is measured to ignore
    each region's colour and brightness; ``cutmix_p`` 1) put the student above its teacher; a student that
    sees RGB, one image at a time (every view transformed as a whole), stays below: it reads the brightness."""
    import torch

    world = _precompute(tmp_path)
    teacher, student = _run(tmp_path, world, [])
    assert student >= teacher + 5, (teacher, student)
    ck = torch.load(next(tmp_path.glob("run-*/final.pt")), weights_only=True)
    assert json.loads(ck["signature"])["input"] == "local-contrast"
    _, rgb = _run(tmp_path, world, ["train.input=rgb", "train.augment.cutmix_p=0"])
    assert rgb < teacher and student >= rgb + 10, (teacher, student, rgb)
