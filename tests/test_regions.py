"""Per-region recolouring of the student's views (clips4.pipeline.regions, clips4.trainer.regions,
``train.augment.regions``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clips4.pipeline.regions import recolour_regions
from clips4.trainer.augment import AugmentConfig, gate_by_teacher, make_views
from clips4.trainer.regions import apply_regions


def _two_regions(H=16, W=16):
    rng = np.random.default_rng(0)
    img = np.zeros((H, W, 3), np.float32)
    stripes = (np.arange(H) % 4 < 2)[:, None, None]
    img[:, : W // 2] = np.where(stripes, np.array([0.9, 0.2, 0.2]), np.array([0.5, 0.1, 0.1]))
    img[:, W // 2:] = np.where(stripes, np.array([0.2, 0.2, 0.9]), np.array([0.1, 0.1, 0.5]))
    img += rng.normal(0, 0.001, img.shape).astype(np.float32)
    labels = np.zeros((H, W), np.int64)
    labels[:, W // 2:] = 1
    return img, labels


def test_regions_trade_colours_and_keep_their_grey_texture():
    img, labels = _two_regions()
    grey = img.mean(-1)
    own = [img[labels == r].mean(0) for r in (0, 1)]
    swapped = 0
    for seed in range(12):
        out = recolour_regions(img, labels, np.random.default_rng(seed))
        for r in (0, 1):
            m = labels == r
            a, b = grey[m] - grey[m].mean(), out[m].mean(-1) - out[m].mean(-1).mean()
            assert np.corrcoef(a, b)[0, 1] > 0.99  # the same grey pattern
        left = out[labels == 0].mean(0)
        assert np.allclose(left, own[0], atol=0.02) or np.allclose(left, own[1], atol=0.02)  # a region's colours
        swapped += int(np.allclose(left, own[1], atol=0.02))
    assert 0 < swapped < 12  # drawn at random: the red region is sometimes blue, and the other way round
    with pytest.raises(ValueError, match="do not match"):
        recolour_regions(img, labels[:8], np.random.default_rng(0))


def test_views_are_recoloured_per_superpixel_and_reproducibly():
    img, labels = _two_regions(32, 32)
    img8 = (img * 255).round().astype(np.uint8)
    base = dict(size=32, photometric="none", geometric="imposed", zoom=(1.0, 1.0), flip_p=0.0)
    plain = make_views(img8, labels, None, rng=1, cfg=AugmentConfig(**base, regions="none"))
    a = make_views(img8, labels, None, rng=1, cfg=AugmentConfig(**base, regions="imposed"))
    b = make_views(img8, labels, None, rng=1, cfg=AugmentConfig(**base, regions="imposed"))
    for p, x, y in zip(plain, a, b):
        assert torch.equal(p["labels"], x["labels"]) and p["box"] == x["box"]  # geometry untouched
        assert torch.equal(x["image"], y["image"]) and not torch.equal(p["image"], x["image"])
    t = torch.from_numpy(img).permute(2, 0, 1)
    with pytest.raises(ValueError, match="do not match"):
        apply_regions(t, labels[:8], torch.Generator())


def test_auto_recolours_regions_only_for_a_teacher_that_ignores_it():
    cfg = AugmentConfig(size=16, photometric="auto", regions="auto")
    out, kept = gate_by_teacher(cfg, {"palette": 1.0, "local_recolour": 0.97}, 0.9)
    assert out.regions == "imposed" and "regions" in kept
    out, kept = gate_by_teacher(cfg, {"palette": 1.0, "local_recolour": 0.4}, 0.9)  # a teacher reading colour
    assert out.regions == "none" and "regions" not in kept
    assert gate_by_teacher(cfg, {"palette": 1.0}, 0.9)[0].regions == "none"  # not measured (an older stage)
    img, labels = np.zeros((32, 48, 3), np.uint8), np.zeros((32, 48), np.int64)
    with pytest.raises(ValueError, match="auto"):  # never silently treated as another mode
        make_views(img, labels, None, cfg=AugmentConfig(size=16, photometric="imposed", geometric="imposed",
                                                        regions="auto"))


def test_pasted_regions_bring_their_pixels_ids_and_teacher_features():
    from clips4.trainer.regions import paste_regions

    H, W = 32, 48
    a = (np.zeros((H, W, 3), np.uint8), (np.arange(W)[None].repeat(H, 0) // 12).astype(np.int32),
         np.zeros((4, 6, 5), np.float16))
    b_lab = (np.arange(40)[:, None] // 10 * 4 + np.arange(60)[None] // 15).astype(np.int32)  # 16 blocks, 40x60
    b = (np.full((40, 60, 3), 200, np.uint8), b_lab, np.ones((5, 8, 5), np.float16))
    image, labels, feats = paste_regions(a, b, np.random.default_rng(3))
    pasted = image[..., 0] == 200
    assert 0.2 < pasted.mean() < 0.8  # about half of b's regions
    assert labels[pasted].min() >= 4 and labels[~pasted].max() <= 3  # b's ids after a's, a's kept
    assert set(np.unique(labels[pasted])) <= set(range(4, 20))
    assert feats.dtype == np.float16 and feats.shape == (4, 6, 5)
    cells = pasted.reshape(4, 8, 6, 8).mean((1, 3)) > 0.5
    assert np.array_equal(feats[..., 0] == 1, cells)  # the teacher of a pasted cell is b's
    same = paste_regions(a, b, np.random.default_rng(3))
    assert np.array_equal(same[1], labels)  # a function of the generator


def test_pasted_box_covers_its_area_with_its_pixels_ids_and_teacher_features():
    from clips4.trainer.regions import paste_box

    H, W = 32, 48
    a = (np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.int32), np.zeros((4, 6, 5), np.float16))
    b = (np.full((40, 60, 3), 200, np.uint8), np.zeros((40, 60), np.int32), np.ones((5, 8, 5), np.float16))
    for seed in range(20):
        image, labels, feats = paste_box(a, b, np.random.default_rng(seed), area=0.5)
        box = image[..., 0] == 200
        ys, xs = np.nonzero(box)
        assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one axis-aligned box
        assert 0.4 < box.mean() < 0.6
        assert np.all(labels[box] == 1) and np.all(labels[~box] == 0)  # one segment (a single-region image) each
        cells = box.reshape(4, 8, 6, 8).mean((1, 3)) > 0.5
        assert np.array_equal(feats[..., 0] == 1, cells)
    assert np.array_equal(paste_box(a, b, np.random.default_rng(1))[0], paste_box(a, b, np.random.default_rng(1))[0])


def test_cutmix_views_are_a_function_of_the_view_seed(tmp_path):
    """``train.augment.cutmix_p``: every view mixes another training image in, the same one for the same seed
    (a resumed run sees the batches an uninterrupted one saw); cutmix_p 0 leaves the image alone."""
    from clips4.trainer.data import CachedViews

    class Fake(CachedViews):
        def __init__(self, p):  # three single-colour images, no caches
            self.image_ids = ["a", "b", "c"]
            self.aug = AugmentConfig(size=16, photometric="none", geometric="imposed", zoom=None, scale=(1.0, 1.0),
                                     flip_p=0.0, cutmix_p=p)
            self.cache_images, self._memo, self._readers = 0, {}, None

        def _read(self, image_id):
            v = {"a": 10, "b": 120, "c": 240}[image_id]
            return (np.full((16, 16, 3), v, np.uint8), np.zeros((16, 16), np.int32),
                    np.full((2, 2, 4), v, np.float16), None, None)

    mixed, plain = Fake(1.0), Fake(0.0)
    v1, v2 = mixed[(0, 5)], mixed[(0, 5)]
    assert torch.equal(v1[0]["image"], v2[0]["image"])
    assert len(torch.unique(v1[0]["image"][0])) == 2  # a and one other image
    assert len(torch.unique(plain[(0, 5)][0]["image"][0])) == 1
