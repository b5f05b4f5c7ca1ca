import math

import numpy as np
import torch

from clips4.trainer.augment import (
    AugmentConfig,
    collate_views,
    denormalize_image,
    make_views,
    resample_clip,
)

H, W = 60, 80
#: SimCLR's views at native scale, everything imposed (train.augment's defaults are ``auto``, resolved by the trainer)
SIMCLR = {"photometric": "imposed", "geometric": "imposed", "zoom": (1.0, 1.0), "channel_shuffle_p": 0.0,
          "invert_p": 0.0, "regions": "none"}


def _cfg(**kw) -> AugmentConfig:
    return AugmentConfig(**{**SIMCLR, **kw})


NOPHOTO = _cfg(size=64, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def _inputs(D=8, grid=(4, 5)):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    labels = (np.arange(H)[:, None] * W + np.arange(W)[None, :]).astype(np.int32)  # unique id = position
    clip = rng.normal(size=grid + (D,)).astype(np.float16)
    return img, labels, clip


def test_shapes_and_determinism():
    img, labels, clip = _inputs()
    a = make_views(img, labels, clip, rng=3, cfg=_cfg(size=64))
    b = make_views(img, labels, clip, rng=torch.Generator().manual_seed(3), cfg=_cfg(size=64))
    c = make_views(img, labels, clip, rng=4, cfg=_cfg(size=64))
    assert len(a) == 2
    v = a[0]
    assert v["image"].shape == (3, 64, 64) and v["image"].dtype == torch.float32
    assert v["labels"].shape == (64, 64) and v["labels"].dtype == torch.int64
    assert v["labels_ds"].shape == (8, 8) and v["clip"].shape == (8, 8, 8)[:1] + (8, 8)
    assert torch.allclose(v["clip"].norm(dim=0), torch.ones(8, 8), atol=1e-5)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["clip"], y["clip"]) and x["box"] == y["box"]
    assert any(x["box"] != y["box"] or x["flip"] != y["flip"] for x, y in zip(a, c))
    assert a[0]["box"] != a[1]["box"]  # two different views


def test_labels_follow_box_and_flip_exactly():
    img, labels, clip = _inputs()
    for seed in range(6):
        for v in make_views(img, labels, clip, rng=seed, cfg=NOPHOTO):
            top, left, h, w = v["box"]
            for key, n in (("labels", 64), ("labels_ds", 8)):
                lab = v[key].numpy()
                ys, xs = lab // W, lab % W
                cy = top + (np.arange(n) + 0.5) * h / n
                cx = left + (np.arange(n) + 0.5) * w / n
                if v["flip"]:
                    cx = cx[::-1]
                assert np.array_equal(ys[:, 0], np.floor(cy).astype(int))
                assert np.array_equal(xs[0, :], np.floor(cx).astype(int))


def test_image_and_labels_stay_aligned():
    # image colour encodes the label: blocks of 10 x 10 pixels
    labels = ((np.arange(H)[:, None] // 10) * 8 + np.arange(W)[None, :] // 10).astype(np.int32)
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 255, (labels.max() + 1, 3), dtype=np.uint8)
    img = palette[labels]
    for seed in range(4):
        for v in make_views(img, labels, None, rng=seed, cfg=NOPHOTO):
            out = denormalize_image(v["image"]).astype(int)
            decoded = np.abs(out[:, :, None, :] - palette[None, None].astype(int)).sum(-1).argmin(-1)
            agree = (decoded == v["labels"].numpy()).mean()
            assert agree > 0.9, agree  # disagreement only on resampled block borders
            assert "clip" not in v


def test_clip_resampling_exact_coordinates():
    gh, gw = 6, 8
    ii, jj = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    clip = np.stack([np.ones((gh, gw)), ii / 10.0, jj / 10.0], -1).astype(np.float32)  # linear in the cell index
    # identity: full box, same grid -> the (normalised) map itself
    same = resample_clip(clip, (96, 128), (0, 0, 96, 128), (gh, gw))
    ref = torch.nn.functional.normalize(torch.from_numpy(clip).permute(2, 0, 1), dim=0)
    assert torch.allclose(same, ref, atol=1e-6)
    for box, flip in [((10, 20, 50, 70), False), ((10, 20, 50, 70), True), ((0, 0, 96, 128), True)]:
        out = resample_clip(clip, (96, 128), box, (5, 7), flip).numpy()
        top, left, h, w = box
        cy = (top + (np.arange(5) + 0.5) * h / 5) * gh / 96 - 0.5  # continuous cell index
        cx = (left + (np.arange(7) + 0.5) * w / 7) * gw / 128 - 0.5
        if flip:
            cx = ((left + w) - (np.arange(7) + 0.5) * w / 7) * gw / 128 - 0.5
        cy, cx = np.clip(cy, 0, gh - 1), np.clip(cx, 0, gw - 1)
        assert np.allclose(out[1] / out[0] * 10, cy[:, None] * np.ones((1, 7)), atol=1e-4)
        assert np.allclose(out[2] / out[0] * 10, np.ones((5, 1)) * cx[None, :], atol=1e-4)


def test_photometric_only_on_image():
    img, labels, clip = _inputs()
    cfg = _cfg(size=64, jitter_p=1.0, gray_p=1.0, blur_p=1.0)
    a = make_views(img, labels, clip, rng=7, cfg=cfg)
    b = make_views(img, labels, clip, rng=7, cfg=NOPHOTO)
    # the geometry is drawn first, so boxes agree; labels/clip identical, image differs
    for x, y in zip(a, b):
        assert x["box"] == y["box"] and x["flip"] == y["flip"]
        assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["clip"], y["clip"])
        assert not torch.equal(x["image"], y["image"])


def test_collate():
    img, labels, clip = _inputs()
    batch = collate_views([make_views(img, labels, clip, rng=s, cfg=_cfg(size=64)) for s in range(3)])
    assert batch["image"].shape == (6, 3, 64, 64) and batch["clip"].shape == (6, 8, 8, 8)
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["labels_ds"].shape == (6, 8, 8) and batch["box"].shape == (6, 4)
    assert math.ceil(64 / 8) == batch["labels_ds"].shape[-1]


def test_teacher_variant_views_replay_the_cached_transform():
    from clips4.pipeline.photometric import PhotometricConfig, apply_ops_uint8, sample_ops

    img, labels, clip = _inputs()
    ops = np.stack([sample_ops(PhotometricConfig(jitter_p=1.0, gray_p=0.0, blur_p=0.0), torch.Generator().manual_seed(s))
                    for s in range(2)])
    rng = np.random.default_rng(1)
    variants = rng.normal(size=(2,) + clip.shape).astype(np.float16)
    cfg = _cfg(size=64, photometric="teacher", zoom=None, scale=(1.0, 1.0), ratio=(W / H, W / H), flip_p=0.0)
    seen = set()
    for seed in range(12):
        for v in make_views(img, labels, clip, rng=seed, cfg=cfg, variants=variants, variant_ops=ops):
            # which source: the clip target tells; the image must be that source's transform of the image
            k = next(j for j, src in enumerate([clip, *variants])
                     if torch.allclose(v["clip"], resample_clip(src, (H, W), v["box"], (8, 8)), atol=1e-5))
            seen.add(k)
            want = img if k == 0 else apply_ops_uint8(img, ops[k - 1])
            ref = make_views(want, labels, None, rng=0, cfg=_cfg(size=64, zoom=None, scale=(1.0, 1.0), ratio=(W / H, W / H),
                                                               flip_p=0.0, photometric="none"))[0]
            assert torch.allclose(v["image"], ref["image"], atol=0.05)
    assert seen == {0, 1, 2}


def test_zoom_crops_keep_the_native_scale_unless_asked():
    from clips4.trainer.augment import sample_zoom_box

    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # zoom 1, square: an S x S box of source pixels, anywhere inside the image
        top, left, h, w = sample_zoom_box(100, 150, 64, g, (1.0, 1.0), (1.0, 1.0))
        assert (h, w) == (64, 64) and 0 <= top <= 36 and 0 <= left <= 86
    sides = [sample_zoom_box(400, 400, 64, g, (0.5, 2.0), (1.0, 1.0))[2] for _ in range(400)]
    assert min(sides) >= 32 and max(sides) <= 128 and min(sides) < 40 and max(sides) > 110
    assert sample_zoom_box(40, 50, 64, g, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 40, 50)  # a small image: all of it
    # views at zoom 1: the crop's pixels are the image's own (no resampling), labels likewise
    img = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    labels = np.arange(80 * 96).reshape(80, 96)
    cfg = _cfg(size=32, zoom=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, photometric="none")
    v = make_views(img, labels, None, rng=3, cfg=cfg)[0]
    top, left, h, w = v["box"]
    np.testing.assert_array_equal(v["labels"].numpy(), labels[top:top + 32, left:left + 32])
    np.testing.assert_array_equal(denormalize_image(v["image"]), img[top:top + 32, left:left + 32])


def test_augment_params_from_yaml_lists_and_one_crop_rule(tmp_path):
    import pytest

    from clips4.trainer.config import AugmentParams

    assert AugmentParams().zoom == (0.7, 1.4) and AugmentParams().scale is None and AugmentParams().geometric == "auto"
    p = AugmentParams.model_validate({"zoom": None, "scale": [0.25, 1.0], "ratio": [0.75, 1.333]})  # YAML lists
    assert p.scale == (0.25, 1.0) and p.zoom is None
    for bad in ({"scale": [0.25, 1.0]}, {"zoom": None}, {"zoom": [2.0, 1.0]}):
        with pytest.raises(ValueError, match="zoom|scale"):
            AugmentParams.model_validate(bad)
