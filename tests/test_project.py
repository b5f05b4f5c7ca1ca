"""One pipeline: a project's clips4.yaml, `clips4 status` / `clips4 repro`, content-keyed whole-dataset stages,
named runs, and self-sufficient checkpoints.

The project is a small synthetic world (folder dataset, synthetic teacher, tiny backbone) driven only through the
CLI from its own working directory, as a cron job would.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest

from clips4.cli import main

PROJECT_YAML = """
cache_root: cache
dataset: {{kind: folder, root: {root}, split: train}}
ray: {{executor: local}}
stages:
  segments: {{params: {{detector: classical}}}}
  clip_features:
    params:
      clip:
        backend: clips4.synthetic:make_teacher
        backend_params: {{n_classes: 6, image_size: [96, 128], world_seed: 0, embed_dim: 64}}
      n_clusters: 6
  prototypes: {{params: {{classes: dataset, top_m: 8, n_unknown: 4, invariance_images: 0}}}}
  train:
    params: {{backbone: tiny, backbone_weights: random, iterations: 3, batch_size: 2, crop_size: 64, head_dim: 32,
             n_segments: 8, num_workers: 0, checkpoint_every: 100, calibration_images: 4}}
"""


def _json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from clips4.synthetic import SyntheticWorld

    base = tmp_path_factory.mktemp("project-world")
    SyntheticWorld().write(base / "w", n_train=12, n_val=2)
    return base / "w"


@pytest.fixture
def project(tmp_path, world, monkeypatch) -> Path:
    """A project folder with 8 of the world's train images and a clips4.yaml; the working directory."""
    root = tmp_path / "data"
    (root / "images" / "train").mkdir(parents=True)
    shutil.copy(world / "classes.txt", root / "classes.txt")
    for p in sorted((world / "images" / "train").glob("*.png"))[:8]:
        shutil.copy(p, root / "images" / "train" / p.name)
    (tmp_path / "clips4.yaml").write_text(PROJECT_YAML.format(root=root))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _add_images(project: Path, world: Path, n: int) -> None:
    for p in sorted((world / "images" / "train").glob("*.png"))[8:8 + n]:
        shutil.copy(p, project / "data" / "images" / "train" / f"new-{p.name}")


def test_repro_status_walkthrough_processes_only_new_images_and_rebuilds_what_depends_on_them(project, world, capsys):
    assert main(["status", "--json"]) == 1
    doc = _json_out(capsys)
    assert {s["stage"]: s["state"] for s in doc["stages"]} == {
        "segments": "missing", "clip_features": "missing", "prototypes": "missing", "train": "missing"}

    assert main(["repro", "--json"]) == 0
    assert _json_out(capsys)["ran"] == ["segments", "clip_features", "prototypes", "train"]
    assert (project / "runs" / "train" / "final.pt").is_file()
    first_run = json.loads((project / "runs" / "train" / "run.json").read_text())
    assert main(["status", "--json"]) == 0
    assert _json_out(capsys)["up_to_date"] is True

    _add_images(project, world, 4)
    assert main(["status", "--json"]) == 1
    doc = _json_out(capsys)
    by = {s["stage"]: s for s in doc["stages"]}
    assert by["segments"]["state"] == "stale" and by["segments"]["todo"] == 4
    assert "4 new images" in by["segments"]["reasons"][0]
    assert by["clip_features"]["state"] == "stale" and by["clip_features"]["todo"] == 4
    assert by["prototypes"]["state"] == "stale" and any("clip_features" in r for r in by["prototypes"]["reasons"])
    assert by["train"]["state"] == "stale"

    assert main(["repro", "--dry-run", "--json"]) == 0
    assert _json_out(capsys)["would_run"] == ["segments", "clip_features", "prototypes", "train"]

    assert main(["repro", "--json"]) == 0
    doc = _json_out(capsys)
    by = {s["stage"]: s for s in doc["stages"]}
    for stage in ("segments", "clip_features"):  # per-image stages: only the 4 new images are computed
        assert by[stage]["summary"]["processed"] == 4 and by[stage]["summary"]["skipped"] == 8
    assert by["prototypes"]["action"] == "ran" and by["train"]["action"] == "ran"
    assert by["train"]["summary"]["stopped"] == "finished"
    second_run = json.loads((project / "runs" / "train" / "run.json").read_text())
    assert second_run["fingerprint"] != first_run["fingerprint"]  # the named run now describes 12 images
    meta = json.loads((project / "runs" / "train" / "meta.json").read_text())
    assert meta["n_images"] == 12

    assert main(["status"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["repro", "--json"]) == 0  # nothing to do is a no-op
    assert _json_out(capsys)["ran"] == []

    # a changed image is stale in the per-image stages and makes the whole-dataset ones stale
    img = sorted((project / "data" / "images" / "train").glob("*.png"))[0]
    img.write_bytes((world / "images" / "train" / "000011.png").read_bytes())
    assert main(["status", "--json"]) == 1
    by = {s["stage"]: s for s in _json_out(capsys)["stages"]}
    assert "1 changed image" in by["segments"]["reasons"][0]

    # removing an image leaves the per-image caches alone but makes prototypes and train stale
    assert main(["repro", "-q"]) == 0
    capsys.readouterr()
    sorted((project / "data" / "images" / "train").glob("new-*.png"))[0].unlink()
    assert main(["status", "--json"]) == 1
    by = {s["stage"]: s for s in _json_out(capsys)["stages"]}
    assert by["segments"]["state"] == "up-to-date" and by["clip_features"]["state"] == "up-to-date"
    assert by["prototypes"]["state"] == "stale" and any("1 image removed" in r for r in by["prototypes"]["reasons"])

    # gc removes the outputs nothing refers to any more (old prototypes and training runs)
    assert main(["cache", "gc", "--dry-run", "--json"]) == 0
    doc = _json_out(capsys)
    assert doc["removed"] and all("/prototypes/" in r["url"] or "/train/" in r["url"] for r in doc["removed"])
    assert all(Path(r["url"]).exists() for r in doc["removed"])
    assert main(["cache", "gc", "--json"]) == 0
    assert not any(Path(r["url"]).exists() for r in _json_out(capsys)["removed"])
    assert (project / "runs" / "train" / "final.pt").is_file()
    assert main(["status", "--json"]) == 1  # gc did not remove the per-image caches: only 2 stages to redo
    by = {s["stage"]: s for s in _json_out(capsys)["stages"]}
    assert by["segments"]["state"] == "up-to-date" and by["clip_features"]["state"] == "up-to-date"


def test_a_smaller_selection_is_another_run_not_nothing_left_to_do(project, capsys):
    assert main(["repro", "-q"]) == 0
    capsys.readouterr()
    # train alone does not build its upstream: it says which output is missing and why, instead of answering
    # from the 8-image run
    assert main(["train", "--limit", "4", "--name", "four"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no finished 'prototypes' output" in err and "the images it was built from" in err and "clips4 repro" in err
    assert main(["repro", "--limit", "4", "--name", "four", "--json"]) == 0
    doc = _json_out(capsys)
    by = {s["stage"]: s for s in doc["stages"]}
    assert doc["ran"] == ["prototypes", "train"] and by["train"]["summary"]["stopped"] == "finished"
    assert by["train"]["summary"]["run"].endswith("four")
    full = json.loads((project / "runs" / "train" / "run.json").read_text())
    four = json.loads((project / "runs" / "four" / "run.json").read_text())
    assert four["fingerprint"] != full["fingerprint"]
    assert json.loads((project / "runs" / "four" / "meta.json").read_text())["n_images"] == 4
    # the prototypes of the 4-image selection are their own output too
    assert main(["status", "--limit", "4", "--json"]) == 1  # the 4-image run is published as 'four', not 'train'
    by = {s["stage"]: s for s in _json_out(capsys)["stages"]}
    assert by["segments"]["state"] == "up-to-date" and by["prototypes"]["state"] == "up-to-date"
    assert by["train"]["state"] == "stale" and "not published" in by["train"]["reasons"][0]
    assert main(["status", "--limit", "4", "--name", "four"]) == 0


def test_a_finished_run_in_a_fixed_folder_trained_on_other_images_is_not_nothing_left_to_do(project, world, capsys):
    out = project / "fixed"
    assert main(["repro", "-q", "--until", "prototypes"]) == 0
    assert main(["train", "--out", str(out), "-q"]) == 0
    _add_images(project, world, 2)
    assert main(["repro", "-q", "--until", "prototypes"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "-q"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trained on other inputs" in err and "2 images added" in err and "--restart" in err


def test_a_run_is_self_sufficient_and_evaluations_find_it_by_folder_or_name(project, world, capsys, tmp_path):
    assert main(["repro", "-q"]) == 0
    capsys.readouterr()
    import torch

    from clips4 import Segmenter

    ck = torch.load(project / "runs" / "train" / "final.pt", weights_only=True)
    spec = json.loads(ck["clip"])
    assert spec["params"]["backend"] == "clips4.synthetic:make_teacher"
    names = (world / "classes.txt").read_text().split()
    assert ck["class_text"]["names"] == names and ck["class_text"]["vectors"].shape == (len(names), 64)

    # from another folder, with no config at all: the run carries its CLIP and its class texts
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import os

    os.chdir(elsewhere)
    seg = Segmenter(project / "runs" / "train")
    image = sorted((world / "images" / "val").glob("*.png"))[0]
    pred = seg.predict(image, names[:3])
    assert pred.labels.shape == (96, 128) and pred.scores.shape[0] == 3
    os.chdir(project)
    assert main(["predict", str(image), "--classes", ",".join(names[:2]), "--model", "train", "--out", "preds", "-q"]) == 0
    assert (project / "preds" / f"{image.stem}_overlay.png").is_file()


def test_newcomer_sequence_with_local_dir_weights_written_once(tmp_path, image_folder, monkeypatch, capsys):
    """clip-features with local-dir: weights, then prototypes, train and Segmenter(run): the weights are given once
    (an option on the first command fails the next with the neighbour and the differing key; clips4.yaml or the
    same option on every command works)."""
    from conftest_clip import make_tiny_clip

    tiny = make_tiny_clip(tmp_path / "tiny", "vit")
    monkeypatch.chdir(tmp_path)
    base = ["--dataset", "folder", "--root", str(image_folder), "--executor", "local", "-q"]
    small = ["--set", "clip_features.clip.short_side=64", "--set", "clip_features.clip.window=64",
             "--set", "clip_features.clip.stride=32", "--set", "clip_features.n_clusters=3"]
    assert main(["precompute", "segments", *base, "--detector", "classical"]) == 0
    assert main(["precompute", "clip-features", *base, *small, "--clip-pretrained", f"local-dir:{tiny.local_dir}"]) == 0
    capsys.readouterr()
    # the next command without the weights: the error names the finished neighbour and the key that differs
    assert main(["precompute", "prototypes", *base, *small, "--classes", "voc"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "clip_features.clip.pretrained" in err and f'"local-dir:{tiny.local_dir}" there' in err
    assert '"openai" here' in err and "Traceback" not in err
    # every downstream command takes the same option with the same meaning
    assert main(["precompute", "prototypes", *base, *small, "--classes", "voc", "--top-m", "2", "--n-unknown", "2",
                 "--clip-pretrained", f"local-dir:{tiny.local_dir}"]) == 0
    # ... or it is written once, in the project's clips4.yaml
    (tmp_path / "clips4.yaml").write_text(
        f"dataset: {{kind: folder, root: {image_folder}}}\nray: {{executor: local}}\nstages:\n"
        f"  segments: {{params: {{detector: classical}}}}\n"
        f"  clip_features: {{params: {{clip: {{pretrained: 'local-dir:{tiny.local_dir}', short_side: 64, window: 64, "
        f"stride: 32}}, n_clusters: 3}}}}\n"
        f"  prototypes: {{params: {{classes: voc, top_m: 2, n_unknown: 2}}}}\n"
        f"  train: {{params: {{backbone: tiny, backbone_weights: random, iterations: 2, batch_size: 2, crop_size: 32, "
        f"head_dim: 16, n_segments: 4, num_workers: 0, calibration_images: 2}}}}\n")
    assert main(["status", "-q"]) == 1  # only train is left
    assert main(["train", "-q"]) == 0
    assert main(["status", "-q"]) == 0
    from clips4.pipeline.cache import list_stage_outputs

    (cf,) = [o for o in list_stage_outputs("cache") if o["stage"] == "clip_features"]
    meta = json.loads((Path(cf["url"]) / "meta.json").read_text())
    # the architecture that ran is the folder's, not the default model name
    assert meta["preflight"]["model"].startswith("local-dir:")
    assert meta["preflight"]["architecture"]["embed_dim"] == tiny.config["embed_dim"]

    from clips4 import Segmenter

    monkeypatch.chdir(image_folder)  # no clips4.yaml here: the run names its own CLIP
    seg = Segmenter(tmp_path / "runs" / "train")
    assert seg.source.info["clip"]["pretrained"] == f"local-dir:{tiny.local_dir}"
    pred = seg.predict(image_folder / "img0.png", ["aeroplane", "a red square"])  # a stored and a new class text
    assert pred.labels.shape == (40, 60)


def _tiny_voc(root: Path, n: int = 6) -> Path:
    """A VOC-layout folder: n small JPEGs with label PNGs (background 0, two object classes, void 255)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for k, i in enumerate(ids):
        img = np.zeros((48, 64, 3), np.uint8)
        img[:, :32] = (200, 40, 40)
        img[:, 32:] = (40, 40, 200)
        img = np.clip(img + rng.integers(-15, 15, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg")
        gt = np.zeros((48, 64), np.uint8)
        gt[:, 8:30] = 15  # person
        gt[:, 36:60] = 7 if k % 2 else 0  # car
        gt[:, 31:33] = 255
        Image.fromarray(gt, mode="L").save(root / "SegmentationClass" / f"{i}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_evaluate_language_on_voc_applies_the_stored_calibration_by_default(tmp_path, monkeypatch, capsys):
    from conftest_clip import make_tiny_clip

    tiny = make_tiny_clip(tmp_path / "tiny", "vit")
    voc = _tiny_voc(tmp_path / "voc")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips4.yaml").write_text(
        f"dataset: {{kind: voc, root: {voc}, split: train}}\nray: {{executor: local}}\nstages:\n"
        f"  segments: {{params: {{detector: classical}}}}\n"
        f"  clip_features: {{params: {{clip: {{pretrained: 'local-dir:{tiny.local_dir}', short_side: 64, window: 64, "
        f"stride: 32}}, n_clusters: 3}}}}\n"
        f"  prototypes: {{params: {{classes: voc, top_m: 2, n_unknown: 2, invariance_images: 0}}}}\n"
        f"  train: {{params: {{backbone: tiny, backbone_weights: random, iterations: 2, batch_size: 2, crop_size: 32, "
        f"head_dim: 16, n_segments: 4, num_workers: 0, calibration_images: 4}}}}\n"
        f"evaluations: {{val: {{task: language, split: val}}}}\n")
    assert main(["repro", "--json"]) == 0
    doc = _json_out(capsys)
    assert doc["ran"] == ["segments", "clip_features", "prototypes", "train", "evaluate:val"]
    results = json.loads((tmp_path / "reports" / "val" / "results.json").read_text())
    assert "calibration stored" in results["protocol"] and results["evaluated"]["n_images"] == 6
    assert main(["status", "-q"]) == 0
    assert main(["repro", "--json"]) == 0
    assert _json_out(capsys)["ran"] == []
    import torch

    cal = torch.load(tmp_path / "runs" / "train" / "final.pt", weights_only=True)["calibration"]
    assert cal and len(cal["classes"]) == 20 and "background" not in cal["classes"]

    assert main(["evaluate", "language", "--split", "val", "--checkpoint", "runs/train", "--out", "rep", "--json",
                 "--overlays", "1"]) == 0
    doc = _json_out(capsys)
    pm = doc["prior_matching"]
    assert pm["applied"] is True and pm["source"] == "checkpoint"
    assert pm["classes"][0] == "background" and pm["bias"][0] == 0.0 and len(pm["bias"]) == 21
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert res["voc_mode"] == 21 and "VOC-21" in res["protocol"] and "calibration stored" in res["protocol"]
    assert "VOC-21" in (tmp_path / "rep" / "report.md").read_text()
    # the 20-class protocol by its list name, the same name prototypes takes
    assert main(["evaluate", "language", "--split", "val", "--checkpoint", "runs/train", "--classes", "voc20",
                 "--out", "rep20", "--json", "--overlays", "0"]) == 0
    doc = _json_out(capsys)
    assert doc["prior_matching"]["applied"] is True and len(doc["prior_matching"]["bias"]) == 20
    res = json.loads((tmp_path / "rep20" / "results.json").read_text())
    assert res["voc_mode"] == 20 and "VOC-20" in res["protocol"]
    assert main(["report", "rep", "rep20", "--json"]) == 0
    table = _json_out(capsys)["table"]
    assert "Protocol" in table and "VOC-21" in table and "VOC-20" in table


def test_per_image_fingerprints_keep_their_formula_and_whole_dataset_ones_digest_their_inputs():
    """Per-image outputs (segments, clip_features) keep the folders they always had; a whole-dataset stage's
    fingerprint also digests its inputs, so it changes exactly when they do."""
    import hashlib

    from clips4.pipeline.stage import fingerprint

    ds = {"kind": "folder", "root": "/data", "split": None, "key": "folder-all-0"}
    payload = {"stage": "segments", "version": "2", "params": {"a": 1}, "deps": {},
               "dataset": {"kind": "folder", "root": "/data", "split": None}}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fingerprint("segments", "2", {"a": 1}, {}, ds) == expected
    a = fingerprint("prototypes", "3", {"a": 1}, {"clip_features": "x"}, ds, {"images": "1", "clip_features": "2"})
    b = fingerprint("prototypes", "3", {"a": 1}, {"clip_features": "x"}, ds, {"images": "1", "clip_features": "3"})
    assert a != b and a != fingerprint("prototypes", "3", {"a": 1}, {"clip_features": "x"}, ds)


def test_a_damaged_finished_output_is_stale_and_repro_repairs_it(project, capsys):
    assert main(["repro", "-q", "--until", "clip_features"]) == 0
    capsys.readouterr()
    shard = next(p for p in sorted((project / "cache").rglob("*")) if "segments" in p.parts and p.is_file()
                 and "parts" in p.parts and ".zarr" in str(p) and p.stat().st_size > 100)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["status", "--until", "clip_features", "--json"]) == 1
    by = {s["stage"]: s for s in _json_out(capsys)["stages"]}
    assert by["segments"]["state"] == "stale" and "damaged file" in by["segments"]["reasons"][0]
    assert by["clip_features"]["state"] == "up-to-date"
    assert main(["repro", "--until", "clip_features", "--json"]) == 0
    doc = _json_out(capsys)
    assert doc["ran"] == ["segments"] and doc["stages"][0]["summary"]["processed"] >= 1
    assert main(["status", "--until", "clip_features"]) == 0
