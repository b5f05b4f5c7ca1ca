"""clips4 evaluate language / unsupervised / avgsim / davis --embedding checkpoint, and clips4 report, through the
CLI: a tiny CLIP on a small folder dataset with masks (teacher), and a 4-iteration synthetic-world training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clips4.cli import main
from conftest import make_synthetic, shared_path
from conftest_clip import make_tiny_clip


# ------------------------------------------------------------------------------------------- tiny CLIP world
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"), "vit")


def _masked_folder(root: Path, n: int = 4, split: str = "val") -> Path:
    """Images with three colour regions, masks (0 red, 1 green, 2 blue, 255 a thin ignored band), classes.txt."""
    rng = np.random.default_rng(0)
    (root / "images" / split).mkdir(parents=True)
    (root / "masks" / split).mkdir(parents=True)
    for i in range(n):
        h, w = 48 + 8 * i, 64
        img = np.zeros((h, w, 3), np.uint8)
        mask = np.zeros((h, w), np.uint8)
        cut = w // 3 + 4 * i
        img[:, :cut] = (210, 30, 30)
        img[:, cut:, 1] = 190
        mask[:, cut:] = 1
        img[h // 2:, cut:] = (30, 30, 210)
        mask[h // 2:, cut:] = 2
        mask[:, cut - 1:cut + 1] = 255
        img = np.clip(img.astype(int) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / split / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / split / f"im{i}.png")
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    return root


def clip_args(tiny) -> list[str]:
    return ["--set", f"clip_features.clip.model={tiny.checkpoint[:-3]}.json",
            "--set", f"clip_features.clip.checkpoint={tiny.checkpoint}",
            "--set", "clip_features.clip.short_side=64", "--set", "clip_features.clip.window=64",
            "--set", "clip_features.clip.stride=32", "--set", "clip_features.n_clusters=3",
            "--set", "ray.executor=local"]


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def test_language_teacher_tiny_clip(tmp_path, tiny, capsys):
    root = _masked_folder(tmp_path / "ds")
    out = tmp_path / "run"
    args = ["evaluate", "language", "--dataset", "folder", "--root", str(root), "--split", "val",
            "--cache", str(tmp_path / "cache"), *clip_args(tiny), "--model", "teacher", "--out", str(out)]
    # the teacher needs the cached clip features: a clear error first, --precompute makes them
    assert main(args) == 2
    assert "clips4 precompute clip-features" in capsys.readouterr().err
    assert main([*args, "--precompute", "--save-predictions", str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "per-class IoU" in printed and "green" in printed
    res = json.loads((out / "results.json").read_text())
    assert _finite(res["miou"]) and _finite(res["pixel_accuracy"]) and res["n_images"] == 4
    assert set(res["per_class_iou"]) == {"red", "green", "blue"}
    assert res["config"]["stages"]["clip_features"]["params"]["clip"]["checkpoint"] == tiny.checkpoint
    assert res["fingerprints"]["embeddings"] and res["fingerprints"]["text_backend"]
    md = (out / "report.md").read_text()
    assert "| Method | mIoU | pAcc" in md and "## Per-class IoU" in md
    for png in ("per_class_iou.png", "confusion.png", "overlay_0.png"):
        Image.open(out / png).verify()
    pred = np.array(Image.open(tmp_path / "pred" / "im0.png"))
    assert pred.shape == (48, 64) and pred.max() <= 2
    assert main([*args, "--voc-mode", "19"]) == 2


# --------------------------------------------------------------------------------------- synthetic world
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    world = tmp_path_factory.mktemp("syn")
    a = make_synthetic(world)
    assert main(["precompute", "prototypes", *a]) == 0
    assert main(["train", *a, "--iterations", "4", "--out", str(world / "run"), "-q"]) == 0
    ck = world / "run" / "final.pt"
    assert ck.is_file()
    return world, a, ck


def test_language_checkpoint_vs_teacher_and_report(synthetic, tmp_path, capsys):
    world, a, ck = synthetic
    base = ["evaluate", "language", *a, "--split", "val", "--overlays", "1"]
    assert main([*base, "--model", "teacher", "--out", str(tmp_path / "teacher")]) == 0
    assert main([*base, "--checkpoint", str(ck), "--out", str(tmp_path / "ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "CLIP-S4 (run/final.pt)" in printed.replace("\n", " ") or "final.pt" in printed
    t = json.loads((tmp_path / "teacher" / "results.json").read_text())
    c = json.loads((tmp_path / "ckpt" / "results.json").read_text())
    assert _finite(t["miou"]) and _finite(c["miou"]) and t["n_images"] == c["n_images"] == 3
    assert c["embedding"]["checkpoint"] == str(ck) and c["embedding"]["step"] == 4
    assert len(c["per_class_iou"]) == 6
    assert c["fingerprints"]["embeddings"] != t["fingerprints"]["embeddings"]
    # clips4 report: the two runs side by side
    table = tmp_path / "side.md"
    assert main(["report", str(tmp_path / "teacher"), str(tmp_path / "ckpt"), "--out", str(table)]) == 0
    lines = [ln for ln in table.read_text().splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| Method | mIoU | pAcc")
    assert len(lines) == 3 and "(teacher)" in lines[1] and "(ckpt)" in lines[2]
    assert f"{100 * t['miou']:.1f}" in lines[1]


def test_unsupervised_teacher_and_checkpoint(synthetic, tmp_path, capsys):
    world, a, ck = synthetic
    base = ["evaluate", "unsupervised", *a, "--train-split", "train", "--split", "val", "--epochs", "3"]
    assert main([*base, "--model", "teacher", "--out", str(tmp_path / "u1")]) == 0
    assert main([*base, "--checkpoint", str(ck), "--segments", "kmeans", "--out", str(tmp_path / "u2")]) == 0
    printed = capsys.readouterr().out
    assert "k-NN" in printed and "linear" in printed
    for d in ("u1", "u2"):
        r = json.loads((tmp_path / d / "results.json").read_text())
        assert _finite(r["knn_miou"]) and _finite(r["linear_miou"])
        assert r["n_train_images"] == 6 and r["n_images"] == 3 and r["n_train_segments"] > 6
        assert "mIoU (k-NN)" in (tmp_path / d / "report.md").read_text()
    # the teacher's segments vote well above chance (6 classes) on this world
    assert json.loads((tmp_path / "u1" / "results.json").read_text())["knn_miou"] > 0.2


def test_avgsim(synthetic, tmp_path, capsys):
    world, a, ck = synthetic
    assert main(["evaluate", "avgsim", *a, "--checkpoint", str(ck), "--out", str(tmp_path / "s")]) == 0
    assert "avgsim =" in capsys.readouterr().out
    r = json.loads((tmp_path / "s" / "results.json").read_text())
    assert -1.0 <= r["avgsim"] <= 1.0 and r["n_segments"] >= 6 and r["n_images"] == 6
    assert main(["evaluate", "avgsim", *a, "--checkpoint", str(ck), "--segments", "ucm", "--out", str(tmp_path / "u")]) == 0
    assert json.loads((tmp_path / "u" / "results.json").read_text())["n_segments"] > r["n_segments"] // 2
    assert main(["evaluate", "avgsim", *a, "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_predict_with_checkpoint(synthetic, tmp_path):
    world, a, ck = synthetic
    img = sorted((world / "world" / "images" / "val").glob("*.png"))[0]
    out = tmp_path / "p"
    assert main(["predict", str(img), "--classes", str(world / "world" / "classes.txt"), "--checkpoint", str(ck),
                 "--out", str(out), "--config", str(world / "synthetic.yaml")]) == 0
    doc = json.loads((out / f"{img.stem}_areas.json").read_text())
    assert doc["queried_classes"] == (world / "world" / "classes.txt").read_text().split()
    assert sum(v["fraction"] for v in doc["classes"].values()) == pytest.approx(1.0)


def test_davis_checkpoint_embedding(synthetic, tmp_path, capsys):
    root = shared_path("DAVIS")
    world, a, ck = synthetic
    seq = sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir())[0]
    out = tmp_path / "davis"
    assert main(["evaluate", "davis", "--root", str(root), "--embedding", "checkpoint", "--checkpoint", str(ck),
                 "--sequences", seq, "--limit-frames", "3", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "davis_results.json").read_text())
    assert res["config"]["embedding"] == "checkpoint" and res["config"]["checkpoint"] == str(ck)
    g = res["global"]
    assert 0.0 <= g["J-Mean"] <= 1.0 and 0.0 <= g["F-Mean"] <= 1.0
    assert len(list((out / seq).glob("*.png"))) == 3
    assert main(["evaluate", "davis", "--root", str(root), "--embedding", "checkpoint", "--limit-frames", "3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_every_new_option_has_help():
    from typer.main import get_command

    from clips4.cli.app import app

    root = get_command(app)
    cmds = []
    for group in root.commands.values():  # every command of every group
        cmds += list(group.commands.values()) if hasattr(group, "commands") else [group]
    ev = root.commands["evaluate"]
    for cmd in cmds:
        assert cmd.help
        for p in cmd.params:
            assert getattr(p, "help", None), f"{cmd.name}: {p.name} has no help"
    language = ev.commands["language"]
    voc = next(p for p in language.params if p.name == "voc_mode")
    assert "20" in voc.help and "21" in voc.help and "background" in voc.help


def test_language_prior_matching_fits_on_train_and_is_recorded(synthetic, tmp_path, capsys):
    """--prior-matching train: a per-class bias fitted on the train split's cached teacher features brings the
    checkpoint's class frequencies there closer to the teacher's; results.json records it; a missing split's cache is a
    usage error, not a traceback."""
    world, a, ck = synthetic
    base = ["evaluate", "language", *a, "--split", "val", "--overlays", "0", "--checkpoint", str(ck)]
    assert main([*base, "--prior-matching", "train", "--prior-mode", "match", "--out", str(tmp_path / "pm")]) == 0
    r = json.loads((tmp_path / "pm" / "results.json").read_text())
    pm = r["prior_matching"]
    assert pm["split"] == "train" and pm["n_images"] == 6 and len(pm["bias"]) == 6
    gap = lambda f: sum(abs(x - y) for x, y in zip(f, pm["teacher_freq"]))  # noqa: E731
    assert gap(pm["matched_freq"]) <= gap(pm["student_freq"]) + 1e-9  # (a 4-step student ranks too little to match)
    # the agreement guard (train.calibration_guard) is on for a refit as in training; the flag turns it off
    assert pm["agreement"] and pm["scale"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert "of the fitted bias kept (mean IoU with the teacher's labels" in capsys.readouterr().out  # as training says
    assert main([*base, "--prior-matching", "train", "--prior-mode", "match", "--no-calibration-guard", "--out",
                 str(tmp_path / "unguarded")]) == 0
    assert "of the fitted bias kept" not in capsys.readouterr().out
    un = json.loads((tmp_path / "unguarded" / "results.json").read_text())["prior_matching"]
    assert un["scale"] == 1.0 and un["agreement"] == {}
    assert un["bias"] == pytest.approx([b / pm["scale"] for b in pm["bias"]] if pm["scale"] else un["bias"])
    assert main([*base, "--prior-matching", "none", "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["prior_matching"] is None
    capsys.readouterr()
    assert main([*base, "--prior-matching", "nosuchsplit", "--out", str(tmp_path / "bad")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_train_stores_the_class_calibration_and_evaluate_applies_it(synthetic, tmp_path, capsys):
    """`clips4 train` fits the class calibration (train.calibration: band) on its training images and stores it in
    final.pt; `evaluate language` applies it by default when the evaluated classes are the calibrated ones, says why
    not otherwise, and `--prior-matching none` is plain arg-max."""
    import torch

    world, a, ck = synthetic
    cal = torch.load(ck, weights_only=True)["calibration"]
    assert cal["mode"] == "band" and cal["collapse_ratio"] == 0.85 and cal["n_images"] == 6
    assert cal["classes"] == json.loads((ck.parent / "config.json").read_text())["classes"]
    assert len(cal["bias"]) == 6 and tuple(cal["text"].shape)[0] == 6
    base = ["evaluate", "language", *a, "--split", "val", "--overlays", "0", "--checkpoint", str(ck)]
    assert main([*base, "--out", str(tmp_path / "cal"), "--json"]) == 0
    pm = json.loads((tmp_path / "cal" / "results.json").read_text())["prior_matching"]
    assert pm["source"] == "checkpoint" and pm["applied"] and pm["bias"] == pytest.approx(cal["bias"])
    # a class list the checkpoint was not calibrated on: not applied, and the results say why
    assert main([*base, "--classes", "red,green,blue", "--out", str(tmp_path / "other")]) == 0
    pm = json.loads((tmp_path / "other" / "results.json").read_text())["prior_matching"]
    assert pm["applied"] is False and "'red'" in pm["why"]
    printed = capsys.readouterr()
    assert "class calibration: not applied" in printed.out + printed.err
