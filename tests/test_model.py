import logging
import os
import time

import pytest
import torch

from clips4.trainer import model as M
from clips4.trainer.model import (
    BACKBONES,
    ModelConfig,
    WeightsError,
    build_backbone,
    build_model,
    check_signature,
    model_signature,
    upsample_embeddings,
)


def test_tiny_forward_shape_norm_grad():
    net = build_model(backbone="tiny", embed_dim=16, backbone_weights="random", head_dim=32)
    x = torch.randn(2, 3, 50, 66)
    z = net(x)
    assert z.shape == (2, 16, 7, 9) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 7, 9), atol=1e-5)
    z.sum().backward()
    assert net.backbone.body[0][0].weight.grad.abs().sum() > 0
    up = upsample_embeddings(z.detach(), (50, 66))
    assert up.shape == (2, 16, 50, 66) and torch.allclose(up.norm(dim=1), torch.ones(2, 50, 66), atol=1e-5)


def test_resnet18_dilated_output_stride_8():
    bb = build_backbone("resnet18")
    with torch.no_grad():
        assert bb.eval()(torch.randn(1, 3, 64, 48)).shape == (1, 512, 8, 6)


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError) as e:
        build_model(backbone="vgg", backbone_weights="random")
    for name in BACKBONES:
        assert name in str(e.value)


def test_missing_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="--backbone-weights"):
        build_model(backbone="tiny", backbone_weights=None)
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_model(backbone="tiny", backbone_weights="imagenet")
    with pytest.raises(WeightsError, match="does not exist"):
        build_model(backbone="tiny", backbone_weights=str(tmp_path / "nope.pth"))


def test_imagenet_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(M, "_host_reachable", lambda url, timeout=3.0: False)
    t = time.time()
    with pytest.raises(WeightsError) as e:
        build_model(backbone="resnet18", backbone_weights="imagenet", embed_dim=8)
    assert time.time() - t < 20
    msg = str(e.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg and "--backbone-weights PATH" in msg and "random" in msg


def test_imagenet_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(M, "_host_reachable", lambda url, timeout=3.0: pytest.fail("must not probe the network"))
    ref = build_backbone("resnet18")
    sd = {**ref.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    f = M._hub_cache_file(M._weights_enum("resnet18").url)
    f.parent.mkdir(parents=True)
    torch.save(sd, f)
    net = build_model(backbone="resnet18", backbone_weights="imagenet", embed_dim=8)
    assert torch.equal(net.backbone.conv1.weight, ref.conv1.weight)
    assert net.weights_source.startswith("imagenet:")


def test_weights_from_file_and_mismatch(tmp_path):
    ref = build_backbone("tiny")
    good = tmp_path / "tiny.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, good)
    net = build_model(backbone="tiny", backbone_weights=str(good), embed_dim=8)
    assert torch.equal(net.backbone.body[0][0].weight, ref.body[0][0].weight)
    sd = ref.state_dict()
    sd.pop("body.0.0.weight")
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(WeightsError) as e:
        build_model(backbone="tiny", backbone_weights=str(bad), embed_dim=8)
    msg = str(e.value)
    assert str(bad) in msg and "body.0.0.weight" in msg and "extra.weight" in msg


def test_random_weights_warn(caplog):
    with caplog.at_level(logging.WARNING):
        build_model(backbone="tiny", backbone_weights="random", embed_dim=8)
    assert "RANDOMLY INITIALISED" in caplog.text


def test_signature():
    cfg = ModelConfig(backbone="tiny", embed_dim=16, backbone_weights="random")
    sig = model_signature(cfg)
    assert sig["backbone"] == "tiny" and sig["embed_dim"] == 16 and sig["arch"] == "pspnet"
    check_signature(sig, ModelConfig(backbone="tiny", embed_dim=16, backbone_weights="/other/path"))
    with pytest.raises(ValueError, match="embed_dim"):
        check_signature(sig, ModelConfig(backbone="tiny", embed_dim=32))
    assert model_signature(sig) == sig  # a saved dict round-trips


def test_local_contrast_input_ignores_region_colour_and_brightness():
    """``input: local-contrast``: two images whose regions wear other colours and brightnesses (the same stripes)
    give the same input away from the region border; the stripes themselves survive."""
    lc = M.LocalContrast()
    H, W = 48, 64
    y = torch.arange(H).view(H, 1).expand(H, W)
    stripes = ((y % 6) < 3).float()
    left = torch.arange(W).view(1, W).expand(H, W) < W // 2

    def paint(colours):
        img = torch.zeros(3, H, W)
        for side, (c, gain) in zip((left, ~left), colours):
            for k in range(3):
                img[k][side] = (c[k] * (1 + gain * (stripes[side] - 0.5)))
        return img[None]

    a = lc(paint([((0.9, 0.2, 0.2), 0.4), ((0.1, 0.1, 0.6), 0.6)]) / 0.225)  # about ImageNet-normalised units
    b = lc(paint([((0.2, 0.3, 0.1), 0.8), ((0.8, 0.8, 0.8), 0.3)]) / 0.225)
    inner = torch.zeros(H, W, dtype=torch.bool)
    inner[14:-14, 14:W // 2 - 14] = True
    inner[14:-14, W // 2 + 14:-14] = True
    assert torch.allclose(a[0, :, inner], b[0, :, inner], atol=0.08)  # colour, brightness, contrast: gone
    assert a[0, 0, inner].std() > 0.5  # the pattern stays
    assert torch.equal(a[0, 0], a[0, 2])  # one grey channel, repeated


def test_input_is_part_of_the_signature_and_runs():
    rgb = ModelConfig(backbone="tiny", embed_dim=16, backbone_weights="random")
    lc = ModelConfig(backbone="tiny", embed_dim=16, backbone_weights="random", input="local-contrast")
    assert "input" not in model_signature(rgb)  # signatures written before the field still match
    assert model_signature(lc)["input"] == "local-contrast"
    with pytest.raises(ValueError, match="input"):
        check_signature(model_signature(lc), rgb)
    with pytest.raises(ValueError, match="input"):
        check_signature(model_signature(rgb), lc)
    z = build_model(lc).eval()(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, 16, 4, 4) and torch.allclose(z.norm(dim=1), torch.ones(2, 4, 4), atol=1e-4)
    with pytest.raises(ValueError, match="valid: rgb, local-contrast"):
        build_model(ModelConfig(backbone="tiny", embed_dim=16, backbone_weights="random", input="hsv"))
