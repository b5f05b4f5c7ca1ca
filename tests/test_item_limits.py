"""Size limits checked from the header before decoding, a per-item time limit, and Pillow's
decompression-bomb guard left on."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import clips4.pipeline.processors as proc
from clips4.pipeline.config import ClipFeaturesParams, SegmentsParams
from clips4.pipeline.datasets import open_dataset
from clips4.pipeline.images import ImageError, load_rgb
from clips4.pipeline.limits import check_image_size, resized_size

REPO = Path(__file__).resolve().parents[1]


class FakeBackend:
    def dense_features(self, images):
        f = np.random.default_rng(0).normal(size=(4, 4, 8)).astype(np.float32)
        return [f / np.linalg.norm(f, axis=-1, keepdims=True) for _ in images]


@pytest.fixture
def strip_and_normal(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (10000, 3), (200, 10, 10)).save(root / "strip.png")  # 3 rows, 10000 columns
    Image.new("RGB", (40, 30), (10, 200, 10)).save(root / "normal.png")
    return open_dataset("folder", str(root)).records()


def test_strip_fails_before_decoding(strip_and_normal, monkeypatch):
    decoded = []
    monkeypatch.setattr(proc, "build_backend", lambda clip: FakeBackend())
    monkeypatch.setattr(proc, "load_rgb", lambda path, **kw: decoded.append(path) or load_rgb(path, **kw))
    p = ClipFeaturesParams(n_clusters=2)
    res = dict(zip([r.image_id for r in strip_and_normal], proc.ClipFeaturesProcessor(p)(strip_and_normal)))
    assert res["normal"].error is None
    assert "strip.png" in res["strip"].error and "max_aspect_ratio=16" in res["strip"].error
    assert [Path(d).name for d in decoded] == ["normal.png"]  # the strip was never decoded

    # with the aspect limit lifted the resized size still stops it (448 x 1,493,333)
    p2 = ClipFeaturesParams(n_clusters=2, max_aspect_ratio=1e6)
    r = proc.ClipFeaturesProcessor(p2)(strip_and_normal[1:])[0]
    assert "max_resized_side=8192" in r.error and "resized to 1493333x448" in r.error


def test_size_checks():
    assert resized_size(3, 10000, 448, 224) == (448, 1493333)
    check_image_size("x", 480, 640, max_pixels=10**6, max_aspect_ratio=4, resized=(448, 597), max_resized_side=1000)
    with pytest.raises(ImageError, match=r"x: image is 1000x1000 = 1\.0 MP, above s\.max_pixels"):
        check_image_size("x", 1000, 1000, max_pixels=999_999, stage="s")
    check_image_size("x", -1, -1, max_pixels=1)  # unknown size: the decoder reports it


def test_item_time_limit_lets_the_batch_go_on(image_folder, monkeypatch):
    import clips4.pipeline.segments as seg

    real = seg.compute_segments
    calls = []

    def slow_first(image, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            t = time.time()
            while time.time() - t < 30:  # a stalled item (Python-level loop, like the UCM merges)
                time.sleep(0.01)
        return real(image, *a, **kw)

    monkeypatch.setattr(seg, "compute_segments", slow_first)
    recs = open_dataset("folder", str(image_folder)).records()[:2]
    t0 = time.time()
    out = proc.SegmentsProcessor(SegmentsParams(item_timeout_s=0.5))(recs)
    assert time.time() - t0 < 20
    assert "item_timeout_s=0.5" in out[0].error and recs[0].path in out[0].error
    assert out[1].error is None and out[1].arrays["labels"].size


def test_pillow_bomb_guard_stays_on(tmp_path, monkeypatch):
    p = tmp_path / "x.png"
    Image.new("RGB", (100, 100)).save(p)
    before = Image.MAX_IMAGE_PIXELS
    load_rgb(str(p))
    assert Image.MAX_IMAGE_PIXELS == before and before is not None  # no process-wide override
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2 x 1000: Pillow refuses it
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb(str(p))


def test_limits_have_one_default():
    """stages.yaml states the same defaults as the params models (nobody has to guess which wins)."""
    spec = yaml.safe_load((REPO / "stages.yaml").read_text())["stages"]
    for stage, model, keys in (("segments", SegmentsParams, ("max_pixels", "item_timeout_s")),
                               ("clip_features", ClipFeaturesParams,
                                ("max_pixels", "max_aspect_ratio", "max_resized_side", "item_timeout_s"))):
        for k in keys:
            assert spec[stage]["params"][k] == model.model_fields[k].default, (stage, k)
