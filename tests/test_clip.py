"""OpenClipBackend on tiny random open_clip models (built by the tests; no network)."""
from __future__ import annotations

import hashlib
import socket
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest_clip import tiny_resnet, tiny_vit  # noqa: F401  (session fixtures)
from clips4.pipeline.backends import load_backend, text_embeddings
from clips4.pipeline.clip import (
    DENSE_VARIANTS,
    OpenClipBackend,
    WeightsMismatchError,
    WeightsNotFoundError,
    window_starts,
)


@pytest.fixture(scope="module", autouse=True)
def _open_clip_imported():
    """open_clip imported before the first test here: the fail-fast timings measure weight resolution, not imports
    (a fixture, not a module import, so a test process that runs none of these does not import it collecting)."""
    import open_clip  # noqa: F401


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _normalised_input(backend, img):
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255.0
    mean = torch.tensor(backend.mean).view(1, 3, 1, 1)
    std = torch.tensor(backend.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _single(tiny, **kw):
    """One native-size window, no resize: the dense head sees exactly the image."""
    return OpenClipBackend(tiny.name, tiny.checkpoint, short_side=None, window=64, stride=64, device="cpu", **kw)


def _vit_trunk(v, x):
    """Plain ViT up to (not including) the last block, batch first."""
    x = F.conv2d(x, v.conv1.weight, stride=16)  # (1, C, 4, 4)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.view(1, 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for blk in v.transformer.resblocks[:-1]:
        x = blk(x)
    return x


def _ln(mod, x):
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


# ------------------------------------------------------------------------------------------------ loading
def test_load_from_checkpoint_file_and_local_dir(tiny_vit):
    a = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, device="cpu")
    b = OpenClipBackend(f"local-dir:{tiny_vit.local_dir}", None, device="cpu")
    c = OpenClipBackend(tiny_vit.name, f"local-dir:{tiny_vit.local_dir}", device="cpu")
    d = OpenClipBackend(tiny_vit.checkpoint[:-3] + ".json", tiny_vit.checkpoint, device="cpu")  # config file
    assert d.info()["model"] == tiny_vit.name
    info = a.info()
    assert info["weights"] == tiny_vit.checkpoint and info["weights_source"] == "file"
    assert info["sha256"] == hashlib.sha256(open(tiny_vit.checkpoint, "rb").read()).hexdigest()
    assert info["variant"] == "maskclip" and info["patch"] == 16 and info["embed_dim"] == 32
    assert (info["short_side"], info["window"], info["stride"]) == (448, 224, 112)
    assert b.info()["weights_source"] == "local-dir" and b.info()["weight_file"].endswith("open_clip_pytorch_model.bin")
    assert a.logit_scale == pytest.approx(100.0, rel=1e-5)
    img = _img(50, 70)
    fa, fb, fc = (x.dense_features([img])[0] for x in (a, b, c))
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(fa, fc)
    t = a.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert t.shape == (2, 32) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_read_only_images_give_no_torch_warning(tiny_vit):
    import warnings

    b = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, short_side=None, window=64, stride=32, device="cpu")
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    ro = img.copy()
    ro.setflags(write=False)  # as PIL's decoded arrays and cached parts are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f_ro = b.dense_features([ro])
    np.testing.assert_array_equal(np.asarray(f_ro[0]), np.asarray(b.dense_features([img])[0]))


def test_load_backend_specs(tiny_vit):
    b = load_backend(None, model=tiny_vit.name, pretrained=tiny_vit.checkpoint, device="cpu")
    assert isinstance(b, OpenClipBackend)
    b2 = load_backend("clips4.pipeline.clip.backend:OpenClipBackend", model=tiny_vit.name,
                      pretrained=tiny_vit.checkpoint, device="cpu")
    assert b2.info()["sha256"] == b.info()["sha256"]
    with pytest.raises(ValueError, match="package.module:Factory"):
        load_backend("no_colon_here")


def test_text_embeddings_prompt_ensemble(tiny_vit):
    b = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, device="cpu")
    templates = ["a photo of a {}.", "a drawing of the {}.", "{} in the wild."]
    T = text_embeddings(b, ["cat", "dog"], templates)
    assert T.shape == (2, 32) and T.dtype == np.float32
    per = b.encode_text([t.format("dog") for t in templates])
    m = per.mean(0)
    np.testing.assert_allclose(T[1], m / np.linalg.norm(m), atol=1e-5)


# ------------------------------------------------------------------------------------------------ dense heads
def test_maskclip_vit_matches_plain_computation(tiny_vit):
    b = _single(tiny_vit)
    img = _img(64, 64, seed=1)
    got = b.dense_features([img])[0]
    assert got.shape == (4, 4, 32) and got.dtype == np.float32

    v = b.model.visual
    with torch.no_grad():
        x = _vit_trunk(v, _normalised_input(b, img))
        blk = v.transformer.resblocks[-1]
        C = x.shape[-1]
        Wv, bv = blk.attn.in_proj_weight[2 * C:], blk.attn.in_proj_bias[2 * C:]
        Wo, bo = blk.attn.out_proj.weight, blk.attn.out_proj.bias
        y = _ln(blk.ln_1, x)
        x = x + ((y @ Wv.T + bv) @ Wo.T + bo)  # value path only, residual kept
        h = _ln(blk.ln_2, x)
        h = F.gelu(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias) @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
        x = x + h  # MLP kept
        out = _ln(v.ln_post, x[:, 1:]) @ v.proj
        want = F.normalize(out, dim=-1).reshape(4, 4, -1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_clearclip_and_sclip_match_plain_computation(tiny_vit):
    img = _img(64, 64, seed=2)
    for variant in ("clearclip", "sclip"):
        b = _single(tiny_vit, variant=variant)
        got = b.dense_features([img])[0]
        v = b.model.visual
        with torch.no_grad():
            x = _vit_trunk(v, _normalised_input(b, img))
            blk = v.transformer.resblocks[-1]
            C, H = x.shape[-1], blk.attn.num_heads
            q, k, val = (_ln(blk.ln_1, x) @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, -1)
            heads = []
            for hh in range(H):
                s = slice(hh * C // H, (hh + 1) * C // H)
                qh, kh, vh = q[0, :, s], k[0, :, s], val[0, :, s]
                sc = (C // H) ** -0.5
                a = torch.softmax(qh @ qh.T * sc, -1)
                if variant == "sclip":
                    a = a + torch.softmax(kh @ kh.T * sc, -1)
                heads.append(a @ vh)
            o = torch.cat(heads, -1)[None] @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
            if variant == "sclip":
                x = x + o
                x = x + blk.mlp(blk.ln_2(x))
            else:
                x = o
            want = F.normalize(_ln(v.ln_post, x[:, 1:]) @ v.proj, dim=-1).reshape(4, 4, -1).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=variant)


def test_naclip_runs_and_bias_is_gaussian(tiny_vit):
    b = _single(tiny_vit, variant="naclip", naclip_std=1.0)
    f = b.dense_features([_img(64, 64)])[0]
    assert f.shape == (4, 4, 32)
    np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, atol=1e-5)
    nb = b._neighbourhood((4, 4), torch.float32, "cpu")
    assert nb.shape == (17, 17) and float(nb[0].abs().sum()) == 0 and float(nb[:, 0].abs().sum()) == 0
    assert float(nb[1, 1]) == pytest.approx(1.0)  # same patch
    assert float(nb[1, 2]) == pytest.approx(np.exp(-0.5))  # one patch apart, std 1
    assert b.info()["naclip_std"] == 1.0


def test_maskclip_resnet_matches_plain_computation(tiny_resnet):
    b = _single(tiny_resnet)
    img = _img(64, 64, seed=3)
    got = b.dense_features([img])[0]
    assert got.shape == (2, 2, 32)
    v = b.model.visual
    with torch.no_grad():
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(_normalised_input(b, img))))))
        ap = v.attnpool
        x = F.conv2d(x, ap.v_proj.weight[:, :, None, None], ap.v_proj.bias)  # 1x1 convolutions
        x = F.conv2d(x, ap.c_proj.weight[:, :, None, None], ap.c_proj.bias)
        want = F.normalize(x, dim=1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_resnet_rejects_vit_only_variants(tiny_resnet):
    for variant in ("sclip", "clearclip", "naclip"):
        with pytest.raises(ValueError, match="ViT-only"):
            OpenClipBackend(tiny_resnet.name, tiny_resnet.checkpoint, variant=variant, device="cpu")


def test_unknown_variant_lists_valid_ones(tiny_vit):
    with pytest.raises(ValueError) as e:
        OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, variant="dinoclip", device="cpu")
    for name in DENSE_VARIANTS:
        assert name in str(e.value)


# ------------------------------------------------------------------------------------------------ geometry
def test_window_starts_cover():
    for length, win, stride in [(448, 224, 112), (592, 224, 112), (300, 224, 96), (224, 224, 112), (100, 224, 112)]:
        starts = window_starts(length, win, stride)
        covered = np.zeros(max(length, win), bool)
        for s in starts:
            covered[s:s + win] = True
            assert s % 16 == 0 or s == length - win
        assert covered[:length].all() and starts[0] == 0
        assert starts[-1] + win == max(length, win)


def test_sliding_windows_average_and_align(tiny_vit):
    img = _img(64, 96, seed=4)
    slide = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, short_side=None, window=64, stride=32, device="cpu")
    one = _single(tiny_vit)
    got = slide.dense_features([img])[0]
    assert got.shape == (4, 6, 32)
    fa = one.dense_features([img[:, :64]])[0]  # window at x0 = 0
    fb = one.dense_features([img[:, 32:]])[0]  # window at x0 = 32 (= 2 cells)
    mid = fa[:, 2:4] + fb[:, 0:2]
    want = np.concatenate([fa[:, :2], mid / np.linalg.norm(mid, axis=-1, keepdims=True), fb[:, 2:]], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_default_protocol_grid_and_normalisation(tiny_vit, tiny_resnet):
    vit = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, device="cpu", batch_size=4)
    rn = OpenClipBackend(tiny_resnet.name, tiny_resnet.checkpoint, device="cpu")
    imgs = [_img(100, 150), _img(375, 500, 1), _img(30, 40, 2)]  # the last is smaller than a window
    fv = vit.dense_features(imgs)
    # short side -> 448 = 28 patches; long side rounded to a multiple of 16
    assert [f.shape for f in fv] == [(28, 42, 32), (28, 37, 32), (28, 37, 32)]
    assert [vit.grid_shape(*i.shape[:2]) for i in imgs] == [f.shape[:2] for f in fv]
    for f in fv:
        assert f.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, atol=1e-5)
    assert vit.info()["stride"] == 112 and rn.info()["stride"] == 96  # rounded to the 32-pixel ResNet stride
    fr = rn.dense_features(imgs[:1])[0]
    assert fr.shape == (14, 21, 32)
    np.testing.assert_allclose(np.linalg.norm(fr, axis=-1), 1.0, atol=1e-5)
    # an image smaller than a window without short-side resize is resized up to the window
    small = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, short_side=None, device="cpu")
    assert small.dense_features([_img(30, 40)])[0].shape == (14, 19, 32)
    # a window that is not the native 64 px: positional embeddings interpolated to its 8x8 grid
    w128 = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, short_side=128, window=128, stride=64, device="cpu")
    assert w128._pos_embed(8, 8, torch.float32, "cpu").shape == (65, 64)
    assert w128.dense_features([_img(128, 192)])[0].shape == (8, 12, 32)
    whole = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, short_side=96, window=None, device="cpu")
    assert whole.dense_features([_img(100, 150)])[0].shape == (6, 9, 32)


# ------------------------------------------------------------------------------------------------ failures
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CLIPS4_OFFLINE", raising=False)
    return tmp_path


def test_missing_weights_offline_fail_fast(empty_caches):
    cache = empty_caches / "clip-cache"
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as e:
        OpenClipBackend("ViT-B-16", "openai", cache_dir=str(cache), offline=True, device="cpu")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "ViT-B-16" in msg and "openai" in msg and "--clip-checkpoint" in msg and "--clip-cache-dir" in msg
    assert str(cache) in msg and "vit_base_patch16_clip_224.openai" in msg  # where it looked


def test_missing_weights_env_offline_and_hf_hub(empty_caches, monkeypatch):
    monkeypatch.setenv("CLIPS4_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="RN50"):
        OpenClipBackend("RN50", "openai", device="cpu")
    with pytest.raises(WeightsNotFoundError, match="hf-hub:someorg/some-clip"):
        OpenClipBackend("hf-hub:someorg/some-clip", None, device="cpu")
    assert time.monotonic() - t0 < 5


def test_missing_weights_hanging_network_fail_fast(empty_caches, monkeypatch):
    """Online mode with a network that never answers: the probe gives up after probe_timeout."""
    def hang(*a, **k):
        time.sleep(30)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", hang)  # nothing leaves the machine
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="not reachable"):
        OpenClipBackend("ViT-B-16", "openai", offline=False, probe_timeout=1.0, device="cpu")
    assert time.monotonic() - t0 < 5


def test_missing_file_unknown_tag_and_no_weights(tiny_vit, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        OpenClipBackend(tiny_vit.name, str(tmp_path / "nope.pt"), device="cpu")
    with pytest.raises(ValueError, match="known tags"):
        OpenClipBackend("ViT-B-16", "not-a-tag", device="cpu", offline=True)
    with pytest.raises(ValueError, match="never uses random"):
        OpenClipBackend(tiny_vit.name, None, device="cpu")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenClipBackend("ViT-Z-99", "openai", device="cpu")
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        OpenClipBackend(f"local-dir:{tmp_path}", None, device="cpu")


def test_checkpoint_of_other_architecture(tiny_vit, tiny_resnet):
    with pytest.raises(WeightsMismatchError) as e:
        OpenClipBackend(tiny_resnet.name, tiny_vit.checkpoint, device="cpu")
    assert "a ViT (width 64, patch 16, 2 layers" in str(e.value) and tiny_vit.checkpoint in str(e.value)


def test_hf_hub_id_resolved_from_local_cache_offline(tiny_vit, tmp_path, monkeypatch):
    """An hf-hub: id whose files are in a Hugging Face cache (as open_clip downloads them) loads offline."""
    import shutil

    monkeypatch.setenv("CLIPS4_OFFLINE", "1")
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--clips4--tiny-vit"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        shutil.copy(f"{tiny_vit.local_dir}/{f}", snap / f)
    b = OpenClipBackend("hf-hub:clips4/tiny-vit", None, cache_dir=str(tmp_path / "hf"), device="cpu")
    assert b.info()["weights_source"] == "hf-hub" and b.info()["weight_file"].startswith(str(snap))
    ref = OpenClipBackend(tiny_vit.name, tiny_vit.checkpoint, device="cpu")
    np.testing.assert_array_equal(b.dense_features([_img(40, 40)])[0], ref.dense_features([_img(40, 40)])[0])
