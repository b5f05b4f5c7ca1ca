import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clips4.synthetic import (
    SyntheticWorld,
    class_text_embeddings,
    miou,
    teacher_segmentation,
)


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(n_classes=6, image_size=(96, 128), seed=0)


@pytest.fixture(scope="module")
def teacher(world):
    return world.teacher(embed_dim=128)


def test_world_deterministic(world):
    a_img, a_mask = world.sample(3, "train")
    b_img, b_mask = SyntheticWorld(n_classes=6, image_size=(96, 128), seed=0).sample(3, "train")
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert a_img.shape == (96, 128, 3) and a_img.dtype == np.uint8 and a_mask.shape == (96, 128)
    c_img, _ = SyntheticWorld(seed=1).sample(3, "train")
    d_img, _ = world.sample(3, "val")
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


def test_masks_cover_all_classes(world):
    seen = set()
    for i in range(10):
        _, m = world.sample(i, "train")
        assert len(np.unique(m)) >= 2
        seen |= set(np.unique(m).tolist())
    assert seen == set(range(6))


def test_write_layout(world, tmp_path):
    from PIL import Image

    out = world.write(tmp_path, n_train=2, n_val=1)
    assert out["train"] == 2 and out["val"] == 1
    assert (tmp_path / "classes.txt").read_text().split() == world.class_names
    img = np.asarray(Image.open(tmp_path / "images" / "train" / "000001.png"))
    mask = np.asarray(Image.open(tmp_path / "masks" / "train" / "000001.png"))
    ref_img, ref_mask = world.sample(1, "train")
    assert np.array_equal(img, ref_img) and np.array_equal(mask, ref_mask)
    assert (tmp_path / "masks" / "val" / "000000.png").is_file()


def test_teacher_features_grid_and_norm(world, teacher):
    img, _ = world.sample(0, "val")
    odd = np.ascontiguousarray(np.pad(img, ((0, 4), (0, 2), (0, 0)), mode="edge"))  # 100 x 130
    f, g = teacher.dense_features([img, odd])
    assert f.shape == (6, 8, 128) and g.shape == (6, 8, 128) and f.dtype == np.float32
    assert np.allclose(np.linalg.norm(f, axis=-1), 1, atol=1e-5)
    assert np.array_equal(f, teacher.dense_features([img])[0])  # deterministic


def test_teacher_text_modality_gap(world, teacher):
    T = teacher.encode_text([f"a photo of a {n}." for n in world.class_names])
    assert T.shape == (6, 128) and np.allclose(np.linalg.norm(T, axis=1), 1, atol=1e-5)
    sims = T @ teacher.class_embeddings.T
    assert (sims.argmax(1) == np.arange(6)).all()
    assert 0.15 < np.diag(sims).mean() < 0.35
    u1, u2 = teacher.encode_text(["a photo of a unicorn.", "a photo of a unicorn."])
    assert np.allclose(u1, u2) and np.abs(u1 @ teacher.class_embeddings.T).max() < 0.3
    info = teacher.info()
    assert info["embed_dim"] == 128 and teacher.logit_scale == 100.0


def test_teacher_miou_imperfect_but_fixable(world, teacher):
    imgs = [world.sample(i, "val") for i in range(12)]
    gts = [m for _, m in imgs]
    preds = [teacher_segmentation(teacher, im) for im, _ in imgs]
    m = miou(preds, gts, 6)
    assert 0.40 <= m <= 0.65, m
    # the teacher's errors are not systematic: averaging its features over the true regions fixes most of them
    T = class_text_embeddings(teacher)
    fixed = []
    for im, gt in imgs:
        f = torch.from_numpy(teacher.dense_features([im])[0]).permute(2, 0, 1)[None]
        up = F.interpolate(f, size=gt.shape, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        p = np.zeros_like(gt)
        for c in np.unique(gt):
            p[gt == c] = (up[gt == c].mean(0) @ T.T).argmax()
        fixed.append(p)
    assert miou(fixed, gts, 6) >= m + 0.15


def test_world_family_presets_build_and_differ():
    from clips4.synthetic import WORLDS, world_from_preset

    for name in WORLDS:
        w, tp = world_from_preset(name, (64, 96), 0)
        img, mask = w.sample(0, "train")
        assert img.shape == (64, 96, 3) and mask.max() < w.n_classes
        f = w.teacher(embed_dim=32, **tp).dense_features([img])[0]
        assert np.allclose(np.linalg.norm(f, axis=-1), 1, atol=1e-4)
    with pytest.raises(ValueError, match="unknown synthetic world"):
        world_from_preset("nope")


def test_spurious_colour_shuffles_palettes_outside_train():
    from clips4.synthetic import world_from_preset

    w, _ = world_from_preset("spurious-colour", (64, 96), 0)
    rng = np.random.default_rng(0)
    means = np.stack([w.render_texture(c, (64, 64), rng).reshape(-1, 3).mean(0) for c in range(w.n_classes)])

    def off_palette(split):  # share of regions whose mean colour is nearest another class's palette
        bad = tot = 0
        for i in range(8):
            img, m = w.sample(i, split)
            for c in np.unique(m):
                mean = img[m == c].reshape(-1, 3).astype(float).mean(0)
                tot += 1
                bad += int(np.abs(means - mean).sum(1).argmin() != c)
        return bad / tot

    assert off_palette("train") < 0.1 and off_palette("val") > 0.4


def test_teacher_confusions_are_consistent_within_an_image():
    from clips4.synthetic import SyntheticWorld

    w = SyntheticWorld(n_classes=4, image_size=(64, 96), seed=0)
    clean = w.teacher(embed_dim=32, noise_patch_p=0, noise_sigma=0, blur=0)
    conf = w.teacher(embed_dim=32, noise_patch_p=0, noise_sigma=0, blur=0, confusion_p=1.0)
    moved = 0
    for i in range(4):
        img, _ = w.sample(i, "train")
        a = (clean.dense_features([img])[0] @ clean.class_embeddings.T).argmax(-1)
        b = (conf.dense_features([img])[0] @ conf.class_embeddings.T).argmax(-1)
        for c in np.unique(a):  # every patch of one class goes to the same other class
            assert len(np.unique(b[a == c])) == 1
            moved += int(np.unique(b[a == c])[0] != c)
        assert np.array_equal(b, (conf.dense_features([img])[0] @ conf.class_embeddings.T).argmax(-1))
    assert moved > 0


def test_spurious_cue_worlds_tie_the_cue_in_train_only_and_context_worlds_group_classes():
    from clips4.synthetic import WORLDS, world_from_preset

    def worn_off(name, split):  # share of regions that wear another class's colours
        w, _ = world_from_preset(name, (48, 64), 0)
        off = tot = 0
        for i in range(12):
            img, mask, worn = w.sample_with_cues(i, split)
            same_img, same_mask = w.sample(i, split)
            assert np.array_equal(img, same_img) and np.array_equal(mask, same_mask)
            for c in np.unique(mask):
                tot += 1
                off += int(worn[mask == c][0] != c)
        return off / tot

    for cue in ("hue", "luminance", "hue-luminance"):
        assert worn_off(f"spurious-{cue}", "train") == 0.0 and worn_off(f"spurious-{cue}", "val") > 0.5
        assert 0.05 < worn_off(f"spurious-{cue}-80", "train") < 0.35  # 20 % redrawn (some redraws hit their own)
    w, _ = world_from_preset("spurious-context", (48, 64), 0)
    groups = [set(g) for g in WORLDS["spurious-context"]["world"]["context_groups"]]
    train = [set(np.unique(w.sample(i, "train")[1]).tolist()) for i in range(12)]
    assert all(any(s <= g for g in groups) for s in train)
    val = [set(np.unique(w.sample(i, "val")[1]).tolist()) for i in range(24)]
    assert any(not any(s <= g for g in groups) for s in val)  # apart at evaluation


def test_the_teachers_old_backend_spelling_still_loads_and_finds_the_same_outputs(tmp_path):
    """Configs, caches and checkpoints written when the teacher lived in ``clips4.pipeline`` name it
    ``clips4.pipeline.synthetic:make_teacher``: that spelling is read as the current one, and both hash to the
    fingerprint the old one always had, so outputs made before the move are found by either."""
    from clips4.pipeline.backends import load_backend
    from clips4.pipeline.config import bundled_configs, load_config
    from clips4.pipeline.datasets import open_dataset
    from clips4.pipeline.stage import identity_params, param_diff, stage_url
    from clips4.synthetic import SyntheticTeacher, SyntheticWorld

    old, new = "clips4.pipeline.synthetic:make_teacher", "clips4.synthetic:make_teacher"
    assert isinstance(load_backend(old, n_classes=3, image_size=(32, 32), embed_dim=8), SyntheticTeacher)
    SyntheticWorld(n_classes=3, image_size=(32, 32)).write(tmp_path / "w", n_train=2, n_val=0)
    fps, params = {}, {}
    for spec in (old, new):
        cfg = load_config(None, [bundled_configs()["synthetic"]], [f"dataset.root={tmp_path / 'w'}",
                          f"cache_root={tmp_path / 'cache'}", f"clip_features.clip.backend={spec}"], search=False)
        assert cfg.params("clip_features").clip.backend == new  # what runs, is recorded and is compared
        ds = open_dataset(cfg.dataset.kind, cfg.dataset.root, cfg.dataset.split)
        fps[spec] = stage_url(cfg, "clip_features", ds)[1]
        params[spec] = identity_params(cfg, "clip_features")
    assert fps[old] == fps[new] and params[new]["clip"]["backend"] == old  # hashed under the old spelling
    there = {**params[new], "clip": {**params[new]["clip"], "backend": new}}  # a meta.json written after the move
    assert param_diff("clip_features", there, params[new]) == []


def test_build_world_writes_the_configs_and_refuses_an_unknown_stage(tmp_path):
    from clips4.synthetic import build_world

    with pytest.raises(ValueError, match="valid: segments, clip_features, prototypes"):
        build_world(tmp_path / "x", 2, 1, stages=("segmnets",))
    assert not (tmp_path / "x").exists()
    b = build_world(tmp_path / "w", 2, 1, world="near-duplicates", seed=3, image_size=(32, 48), stages=(),
                    params={"train": {"iterations": 7}})
    assert sorted(p.name for p in (b.root / "images" / "train").iterdir()) and b.n_classes == 7
    cfg = b.load("dataset.split=val")
    assert cfg.dataset.root == str(b.root) and cfg.cache_root == str(tmp_path / "w" / "cache")
    assert cfg.params("train").iterations == 7
    bp = cfg.params("clip_features").clip.backend_params
    assert (bp["world"], bp["world_seed"], bp["image_size"]) == ("near-duplicates", 3, [32, 48])
    assert b.args()[:2] == ["--config", str(tmp_path / "w" / "synthetic.yaml")]
