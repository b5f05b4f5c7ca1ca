"""clips4 predict with a tiny CLIP as the teacher backend: images outside any cache, odd image modes, a bad file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clips4.cli import main
from conftest_clip import make_tiny_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"), "vit")


def _args(tiny):
    return ["--set", f"clip_features.clip.model={tiny.checkpoint[:-3]}.json",
            "--set", f"clip_features.clip.checkpoint={tiny.checkpoint}",
            "--set", "clip_features.clip.short_side=64", "--set", "clip_features.clip.window=64",
            "--set", "clip_features.clip.stride=32"]


def test_predict_teacher_writes_labels_overlay_areas(tmp_path, tiny, capsys):
    rng = np.random.default_rng(0)
    rgb = np.zeros((40, 70, 3), np.uint8)
    rgb[:20] = (90, 150, 230)
    rgb[20:] = (30, 140, 40)
    Image.fromarray(rgb).save(tmp_path / "scene.jpg")
    # odd modes the segments stage accepts: 16-bit grey, palette, grey+alpha
    Image.fromarray((rng.random((33, 45)) * 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8).save(tmp_path / "pal.png")
    Image.fromarray(rgb).convert("LA").save(tmp_path / "la.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    names = ["sky", "tree", "moon"]
    images = [tmp_path / n for n in ("scene.jpg", "broken.jpg", "grey16.png", "pal.png", "la.png")]
    out = tmp_path / "out"
    code = main(["predict", *map(str, images), "--classes", ",".join(names), "--model", "teacher", "--out", str(out),
                 *_args(tiny)])
    assert code == 1  # one image failed ...
    cap = capsys.readouterr()
    assert "broken.jpg" in cap.err and "4 image(s) written" in cap.out
    assert not list(out.glob("broken*"))
    for stem, (h, w) in (("scene", (40, 70)), ("grey16", (33, 45)), ("pal", (40, 70)), ("la", (40, 70))):
        # ... the others are all written
        lab = Image.open(out / f"{stem}_labels.png")
        assert lab.mode == "P" and lab.size == (w, h) and np.array(lab).max() < len(names)
        ov = Image.open(out / f"{stem}_overlay.png")
        assert ov.mode == "RGB" and ov.size[1] >= h and ov.size[0] > w  # legend panel on the right
        doc = json.loads((out / f"{stem}_areas.json").read_text())
        assert doc["queried_classes"] == names and doc["image_size"] == [h, w]
        assert set(doc["classes"]) <= set(names) and doc["classes"]
        assert sum(c["fraction"] for c in doc["classes"].values()) == pytest.approx(1.0)


def test_predict_missing_checkpoint_is_a_clear_error(tmp_path, tiny, capsys):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--classes", "sky,tree", "--out", str(tmp_path / "o"),
                 "--checkpoint", str(tmp_path / "missing.pt"), *_args(tiny)]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
