"""The teacher's measured photometric invariances (clips4.pipeline.invariances) and ``photometric: auto``, which
imposes on the student only what its teacher ignores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clips4.pipeline.invariances import FAMILIES, LOCAL, measure_invariances, probe_ops


class _CellTeacher:
    """A deterministic toy teacher on an 8 x 8 px grid reading either colour (the brightest channel of the cell)
    or texture (horizontal vs vertical gradient energy): ``(h, w, 5)`` one-hot features."""

    embed_dim = 5

    def __init__(self, cue: str):
        self.cue = cue

    def dense_features(self, images):
        out = []
        for img in images:
            x = img.astype(np.float32)
            h, w = x.shape[0] // 8, x.shape[1] // 8
            cells = x[: h * 8, : w * 8].reshape(h, 8, w, 8, 3).transpose(0, 2, 1, 3, 4)
            f = np.zeros((h, w, 5), np.float32)
            if self.cue == "colour":
                k = cells.mean((2, 3)).argmax(-1)  # (h, w) in 0..2
            else:
                g = cells.mean(-1)
                dx = np.abs(np.diff(g, axis=3)).mean((2, 3))
                dy = np.abs(np.diff(g, axis=2)).mean((2, 3))
                k = 3 + (dy > dx).astype(int)
            np.put_along_axis(f, k[..., None], 1.0, axis=-1)
            out.append(f)
        return out


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.zeros((32, 48, 3), np.uint8)
        for cy in range(4):
            for cx in range(6):
                col = np.full(3, 60, np.uint8)
                col[rng.integers(3)] = 220  # one dominant channel per cell
                stripes = (np.arange(8) % 4 < 2)
                pat = stripes[:, None] if rng.uniform() < 0.5 else stripes[None, :]  # horizontal or vertical bars
                cell = np.where(np.broadcast_to(pat, (8, 8))[..., None], col, col // 3)
                img[cy * 8:(cy + 1) * 8, cx * 8:(cx + 1) * 8] = cell
        out.append(img)
    return out


def test_probes_cover_every_family():
    from clips4.trainer.augment import _FAMILY_FIELDS

    whole = {f for f in FAMILIES if not f.startswith(LOCAL)}
    assert set(probe_ops()) | {"flip", "zoom"} == whole
    assert set(_FAMILY_FIELDS) | {"flip", "zoom"} == whole  # every measured family gates something
    assert {f for f in FAMILIES if f.startswith(LOCAL)} == {"local_recolour"}  # train.augment.regions


def test_a_texture_teacher_ignores_the_palette_a_colour_teacher_does_not():
    protos = np.eye(5, dtype=np.float32)
    tex = measure_invariances(_CellTeacher("texture"), _images(), protos)["families"]
    col = measure_invariances(_CellTeacher("colour"), _images(), protos)["families"]
    assert tex["palette"] >= 0.95 and tex["grayscale"] >= 0.95 and tex["brightness_contrast"] >= 0.95
    assert col["palette"] < 0.7 and col["grayscale"] < 0.7  # grey cells: the brightest channel is arbitrary
    # every region recoloured on its own: the texture teacher keeps its reading, the colour one loses it
    assert tex["local_recolour"] >= 0.95 and col["local_recolour"] < 0.7
    assert measure_invariances(_CellTeacher("colour"), [], protos) == {"families": {}, "baseline": None, "images": 0}
    # geometry: bars keep their orientation under a flip; x0.7 / x1.4 rescales change the 8 px cells' content
    assert tex["flip"] >= 0.95 and col["flip"] >= 0.95
    assert set(tex) == set(FAMILIES)


def test_auto_imposes_only_what_the_teacher_ignores():
    from clips4.trainer.augment import AugmentConfig, gate_by_teacher, make_views

    cfg = AugmentConfig(size=16, photometric="auto")
    out, kept = gate_by_teacher(cfg, {"palette": 1.0, "grayscale": 0.95, "hue": 0.5, "blur": 0.2,
                                      "brightness_contrast": 0.3, "saturation": 0.99}, 0.9)
    assert sorted(kept) == ["grayscale", "palette", "saturation"] and out.photometric == "imposed"
    assert out.jitter == (0.0, 0.0, cfg.jitter[2], 0.0) and out.blur_p == 0.0
    assert out.gray_p == cfg.gray_p and out.channel_shuffle_p == cfg.channel_shuffle_p and out.invert_p == cfg.invert_p
    none, kept = gate_by_teacher(cfg, {}, 0.9)  # not measured: nothing imposed
    assert kept == [] and none.photometric == "none"
    geo = AugmentConfig(size=16, photometric="none", geometric="auto", zoom=(0.7, 1.4), flip_p=0.5)
    out, kept = gate_by_teacher(geo, {"flip": 0.5, "zoom": 0.95}, 0.9)
    assert kept == ["zoom"] and out.flip_p == 0.0 and out.zoom == (0.7, 1.4) and out.geometric == "imposed"
    out, kept = gate_by_teacher(AugmentConfig(size=16, photometric="none", geometric="auto", zoom=None,
                                              scale=(0.25, 1.0)), {"flip": 1.0}, 0.9)
    assert kept == ["flip"] and out.zoom == (1.0, 1.0) and out.scale is None  # not scale-invariant: native scale
    with pytest.raises(ValueError, match="auto"):  # never silently treated as another mode
        make_views(_images(1)[0], np.zeros((32, 48), np.int64), None, cfg=cfg)


def test_trainer_reads_the_prototypes_stage_scores(tmp_path, capsys):
    from clips4.trainer.augment import AugmentConfig
    from clips4.trainer.train import _auto_augment

    (tmp_path / "invariances.json").write_text(json.dumps({"families": {"palette": 1.0, "hue": 0.2}}))
    out = _auto_augment(AugmentConfig(size=16, photometric="auto", channel_shuffle_p=0.5), str(tmp_path), rank=0)
    assert out.photometric == "imposed" and out.channel_shuffle_p > 0 and out.jitter[3] == 0.0
    assert "imposing palette" in capsys.readouterr().err
    out = _auto_augment(AugmentConfig(size=16, photometric="auto"), str(tmp_path / "missing"), rank=0)
    assert out.photometric == "none" and "not measured" in capsys.readouterr().err


def test_stages_cache_teacher_variants_and_invariances_and_train_uses_them(tmp_path):
    """Through the CLI: clip-features with photometric variants (declared outs), prototypes writing
    invariances.json, and short training runs with ``auto`` and ``teacher`` views."""
    from conftest import make_synthetic

    from clips4.cli import main
    from clips4.pipeline.cache import StageReader

    a = make_synthetic(tmp_path / "world", n_train=4, n_val=2)
    var = ["--set", "clip_features.photometric_variants=2", "--set", "clip_features.variant_params={invert_p: 0.5}"]
    assert main(["precompute", "clip-features", *a, *var, "--split", "train", "-q"]) == 0
    assert main(["precompute", "prototypes", *a, *var, "--set", "prototypes.invariance_images=3", "-q"]) == 0
    # the newest clip_features output is the one with variants
    outs = sorted((tmp_path / "world" / "cache").glob("*train*/clip_features/*/index.parquet"), key=lambda p: p.stat().st_mtime)
    r = StageReader(str(outs[-1].parent))
    i = r.image_ids[0]
    assert r.get(i, "variant_features").shape[2] == 2 and r.get(i, "variant_ops").shape == (2, 13)
    inv = json.loads(next((tmp_path / "world" / "cache").glob("*train*/prototypes/*/invariances.json")).read_text())
    assert inv["images"] == 3 and set(inv["families"]) == set(FAMILIES)
    for mode in ("auto", "teacher"):
        assert main(["train", *a, *var, "--set", "prototypes.invariance_images=3", "--set", "train.iterations=2",
                     "--set", f"train.augment.photometric={mode}", "--set", "train.crop_size=64",
                     "--set", f"train.out={tmp_path / mode}", "-q"]) == 0
        assert (tmp_path / mode / "final.pt").exists()


def test_unknown_variant_params_are_a_config_error_before_any_image(tmp_path, capsys):
    from conftest import make_synthetic

    from clips4.cli import main

    a = make_synthetic(tmp_path / "world", n_train=2, n_val=1)
    code = main(["precompute", "clip-features", *a, "--set", "clip_features.photometric_variants=1",
                 "--set", "clip_features.variant_params={hue_p: 1}", "--split", "train", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "hue_p" in err and "invert_p" in err and "Traceback" not in err


def test_an_image_gone_since_its_features_were_cached_is_skipped(tmp_path, capsys):
    from conftest import make_synthetic

    from clips4.cli import main

    a = make_synthetic(tmp_path / "world", n_train=4, n_val=1)
    victim = sorted((tmp_path / "world" / "world" / "images" / "train").glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    assert main(["precompute", "prototypes", *a, "--set", "prototypes.invariance_images=4", "-q"]) == 0
    inv = json.loads(next((tmp_path / "world" / "cache").glob("*train*/prototypes/*/invariances.json")).read_text())
    assert inv["images"] == 3 and "skipping " + victim.stem in capsys.readouterr().err


def test_the_measurement_reports_progress_per_image():
    seen = []
    res = measure_invariances(_CellTeacher("colour"), _images(3), np.eye(5, dtype=np.float32), progress=seen.append)
    assert seen == [1, 2, 3] and res["images"] == 3


def test_the_prototypes_stage_prints_progress_lines_while_it_measures(tmp_path, capsys):
    from types import SimpleNamespace

    from PIL import Image

    from clips4.pipeline.invariances import passes_per_image
    from clips4.pipeline.processors import _teacher_invariances

    paths = {}
    for k, img in enumerate(_images(4)):
        paths[f"im{k}"] = tmp_path / f"im{k}.png"
        Image.fromarray(img).save(paths[f"im{k}"])
    feats = SimpleNamespace(image_ids=list(paths), record=lambda i: SimpleNamespace(path=str(paths[i])))
    protos = SimpleNamespace(vectors=np.eye(5, dtype=np.float32), known_mask=np.ones(5, bool), n_known=5)
    inv = _teacher_invariances(_CellTeacher("colour"), feats, protos, SimpleNamespace(invariance_images=4, seed=0))
    err = capsys.readouterr().err  # not a terminal here: plain lines, as in cron logs
    lines = [ln for ln in err.splitlines() if "teacher invariances" in ln]
    assert inv["images"] == 4 and len(lines) >= 2, err
    assert "0/4" in lines[0] and "4/4" in lines[-1] and f"{passes_per_image()} teacher passes" in lines[0], lines
