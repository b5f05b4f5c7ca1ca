"""Tiny, randomly initialised open_clip models that tests build and save themselves (no network, no hub).

Reuse from any test module (pytest puts the tests folder on ``sys.path``)::

    from conftest_clip import make_tiny_clip
    tiny = make_tiny_clip(tmp_path, arch="vit")          # or arch="resnet"
    backend = OpenClipBackend(tiny.name, tiny.checkpoint, short_side=None, window=64, stride=32, device="cpu")
    backend = OpenClipBackend(f"local-dir:{tiny.local_dir}", None, ...)

or the session fixtures ``tiny_vit`` / ``tiny_resnet`` (import them into the test module:
``from conftest_clip import tiny_vit, tiny_resnet  # noqa: F401``).

The ViT has width 64, 2 layers, 4 heads, patch 16, native input 64 (4x4 grid), embed dim 32; the ModifiedResNet
has layers (1, 1, 1, 1), width 8 (feature width 256), native input 64, embed dim 32. Text towers: width 32,
1 layer, the real BPE tokenizer (bundled with open_clip). The logit scale is set to ln(100) as OpenAI CLIP.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    "vit": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
        "text_cfg": TEXT_CFG,
    },
    "resnet": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64, "patch_size": None},
        "text_cfg": TEXT_CFG,
    },
}


@dataclass
class TinyClip:
    name: str          #: registered open_clip model name (e.g. "clips4-tiny-vit")
    checkpoint: str    #: state-dict file (torch.save) loadable with pretrained=<file>
    local_dir: str     #: folder with open_clip_config.json + open_clip_pytorch_model.bin (local-dir:)
    config: dict       #: the model config


def make_tiny_clip(dst: str | Path, arch: str = "vit", seed: int = 0) -> TinyClip:
    """Build a tiny random open_clip CLIP (``arch`` "vit" or "resnet"), register its config with open_clip under
    ``clips4-tiny-<arch>`` and save it both as a checkpoint file and as a ``local-dir:`` folder under ``dst``."""
    import open_clip
    import torch

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = TINY_CONFIGS[arch]
    name = f"clips4-tiny-{arch}"
    cfg_file = dst / f"{name}.json"
    cfg_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_file)  # registry key = file stem

    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
        if arch == "resnet":
            # zero-initialised bn3 makes every bottleneck an identity; give the tiny net some signal
            for m in model.visual.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    sd = model.state_dict()
    ckpt = dst / f"{name}.pt"
    torch.save(sd, ckpt)

    local = dst / f"{name}-dir"
    local.mkdir(exist_ok=True)
    (local / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }))
    torch.save(sd, local / "open_clip_pytorch_model.bin")
    return TinyClip(name=name, checkpoint=str(ckpt), local_dir=str(local), config=cfg)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> TinyClip:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_vit"), "vit")


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> TinyClip:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_resnet"), "resnet")
