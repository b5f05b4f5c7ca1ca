"""Photometric transforms drawn per region of a view (clips4.trainer.regions, ``train.augment.regions``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clips4.pipeline.photometric import PhotometricConfig
from clips4.trainer.augment import AugmentConfig, gate_by_teacher, make_views
from clips4.trainer.regions import apply_regions, region_config


def _two_regions(S=16):
    img = torch.zeros(3, S, S)
    img[0, :, : S // 2] = 0.8  # left: red
    img[2, :, S // 2:] = 0.8  # right: blue
    labels = torch.zeros(S, S, dtype=torch.int64)
    labels[:, S // 2:] = 1
    return img, labels


def test_each_region_draws_its_own_transform():
    img, labels = _two_regions()
    cfg = PhotometricConfig(jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, channel_shuffle_p=1.0,
                            invert_p=0.0)
    same = 0
    for seed in range(20):
        out = apply_regions(img, labels, cfg, torch.Generator().manual_seed(seed))
        left, right = out[:, :, :8].reshape(3, -1), out[:, :, 8:].reshape(3, -1)
        assert (left == left[:, :1]).all() and (right == right[:, :1]).all()  # one transform per region
        assert sorted(left[:, 0].tolist()) == [0.0, 0.0, pytest.approx(0.8)]  # a channel permutation
        same += int(left[:, 0].argmax() == 0) + int(right[:, 0].argmax() == 2)
    assert same < 12  # permuted independently: each region's colour mostly changes
    with pytest.raises(ValueError, match="do not match"):
        apply_regions(img, labels[:8], cfg, torch.Generator())


def test_region_config_keeps_only_the_families_in_force():
    c = region_config(AugmentConfig(size=16, jitter=(0.4, 0.0, 0.0, 0.0), jitter_p=0.3, gray_p=0.0, blur_p=0.5,
                                    channel_shuffle_p=0.1, invert_p=0.0))
    assert c.blur_p == 0.0 and c.jitter_p == 1.0 and c.channel_shuffle_p >= 0.5 and c.gray_p == 0 and c.invert_p == 0
    assert region_config(AugmentConfig(size=16, jitter=(0.0,) * 4, gray_p=0.0, channel_shuffle_p=0.0,
                                       invert_p=0.0)) is None


def test_auto_imposes_regions_only_where_the_teacher_ignores_them_per_region():
    cfg = AugmentConfig(size=16, photometric="auto", regions="auto")
    every = {"brightness_contrast": 1.0, "saturation": 1.0, "grayscale": 1.0, "palette": 1.0}
    local = {f"local_{k}": 1.0 for k in every}
    out, kept = gate_by_teacher(cfg, {**every, **local}, 0.9)
    assert out.regions == "imposed" and "regions" in kept
    out, kept = gate_by_teacher(cfg, {**every, **local, "local_palette": 0.5}, 0.9)  # a kept family fails per region
    assert out.regions == "none" and "regions" not in kept
    out, kept = gate_by_teacher(cfg, every, 0.9)  # not measured per region (an older prototypes stage)
    assert out.regions == "none"
    out, kept = gate_by_teacher(cfg, {}, 0.9)  # nothing imposed on whole views: nothing per region
    assert out.photometric == "none" and out.regions == "none"
    teacher = AugmentConfig(size=16, photometric="teacher", regions="auto")
    assert gate_by_teacher(teacher, {**every, **local}, 0.9)[0].regions == "none"
    img, labels = np.zeros((32, 48, 3), np.uint8), np.zeros((32, 48), np.int64)
    with pytest.raises(ValueError, match="auto"):
        make_views(img, labels, None, cfg=AugmentConfig(size=16, photometric="imposed", geometric="imposed"))


def test_views_with_regions_change_colours_per_superpixel_and_keep_the_labels():
    rng = np.random.default_rng(0)
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (200, 40, 40)
    img[:, 16:] = (40, 40, 200)
    img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((32, 32), np.int64)
    labels[:, 16:] = 1
    base = dict(size=32, photometric="imposed", geometric="imposed", zoom=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                gray_p=0.0, blur_p=0.0, channel_shuffle_p=0.5, invert_p=0.0)
    plain = make_views(img, labels, None, rng=1, cfg=AugmentConfig(**base, regions="none"))
    mixed = make_views(img, labels, None, rng=1, cfg=AugmentConfig(**base, regions="imposed"))
    for p, m in zip(plain, mixed):
        assert torch.equal(p["labels"], m["labels"]) and p["box"] == m["box"]
    # whole-view permutations keep the two halves apart (different dominant channels); per-region ones sometimes
    # give both the same colour
    def same(v):
        x = v["image"]
        return bool(x[:, :, :16].mean((1, 2)).argmax() == x[:, :, 16:].mean((1, 2)).argmax())

    def views(regions):
        return [v for s in range(12) for v in make_views(img, labels, None, rng=s, cfg=AugmentConfig(**base, regions=regions))]
    assert {same(v) for v in views("imposed")} == {True, False}
    assert {same(v) for v in views("none")} == {False}
