"""clip-features → prototypes → search through the CLI, with a tiny CLIP the test builds itself."""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clips4.pipeline.cache import StageReader, list_stage_outputs
from clips4.cli import main
from conftest_clip import make_tiny_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"), "vit")


@pytest.fixture
def images(image_folder):
    return image_folder


def _args(tiny, cache, root):
    return ["--dataset", "folder", "--root", str(root), "--cache", str(cache),
            "--set", f"clip_features.clip.model={tiny.checkpoint[:-3]}.json",
            "--set", f"clip_features.clip.checkpoint={tiny.checkpoint}",
            "--set", "clip_features.clip.short_side=64", "--set", "clip_features.clip.window=64",
            "--set", "clip_features.clip.stride=32", "--set", "clip_features.n_clusters=3"]


def test_clip_features_prototypes_search(tmp_path, tiny, images, capsys):
    cache = tmp_path / "cache"
    a = _args(tiny, cache, images)
    assert main(["precompute", "clip-features", *a, "--executor", "local", "--quiet"]) == 0
    assert main(["precompute", "clip-features", *a, "--executor", "local", "--quiet"]) == 0
    assert "nothing left to do" in capsys.readouterr().err
    (out,) = [o for o in list_stage_outputs(str(cache)) if o["stage"] == "clip_features"]
    r = StageReader(out["url"])
    assert len(r) == 6
    f = r.get("img0", "features")
    assert f.dtype == np.float16 and f.shape[-1] == 32
    np.testing.assert_allclose(np.linalg.norm(f.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    assert r.meta["preflight"]["sha256"] and r.meta["preflight"]["weight_file"] == tiny.checkpoint
    segs = r.read_table("segments")
    assert segs.num_rows >= 6 and len(set(segs["row_id"].to_pylist())) == segs.num_rows

    assert main(["precompute", "prototypes", *a, "--classes", "voc", "--top-m", "4", "--n-unknown", "5"]) == 0
    (p,) = [o for o in list_stage_outputs(str(cache)) if o["stage"] == "prototypes"]
    t = pq.read_table(p["url"] + "/prototypes.parquet")
    kinds = t["kind"].to_pylist()
    assert kinds.count("known") == 20 and kinds.count("unknown") == 5
    assert t["name"].to_pylist()[:2] == ["aeroplane", "bicycle"]

    png = tmp_path / "sheet.png"
    assert main(["search", "a photo of a red square", *a, "--top", "4", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 100


def test_missing_weights_fail_fast_with_a_clear_message(tmp_path, images, capsys):
    t0 = time.perf_counter()
    code = main(["precompute", "clip-features", "--dataset", "folder", "--root", str(images), "--cache",
                 str(tmp_path / "c"), "--clip-checkpoint", str(tmp_path / "nope.pt"), "--executor", "local", "--quiet"])
    assert code == 2 and time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "nope.pt" in err and "--clip-checkpoint" in err
    assert not list((tmp_path / "c").glob("*/clip_features/*/index.parquet"))
