"""The CLIP-S4 pixel embedding network: PSPNet head on a dilated ResNet (output stride 8).

``build_model(ModelConfig(...))`` returns a :class:`PixelEmbeddingNet` whose ``forward(x)`` maps
``x (B, 3, H, W) float32`` (ImageNet-normalised, see ``clips4.trainer.augment.normalize_image``) to
``z (B, D, ceil(H/8), ceil(W/8)) float32``, L2-normalised along ``D`` at every position.
``upsample_embeddings(z, (H, W))`` brings it back to the input size (bilinear, ``align_corners=False``,
re-normalised), which is also the coordinate convention the augmentation uses for the embedding grid:
embedding cell ``(i, j)`` of an ``(h, w)`` grid over an ``(H, W)`` image is centred at continuous pixel
coordinates ``((i + 0.5) * H / h, (j + 0.5) * W / w)``.

Backbones (``BACKBONES``): ``resnet50`` (the paper's, dilated layer3/layer4), ``resnet18`` (dilated the same
way; torchvision's BasicBlock refuses ``replace_stride_with_dilation`` so strides/dilations are patched
after construction, weights stay compatible), ``tiny`` (a few convs, stride 8, for CPU tests).

Backbone weights (``ModelConfig.backbone_weights``):
- ``"imagenet"``: torchvision's ImageNet weights, read from the torch hub cache if the file is there; when it
  is not, the download host is probed with a 3 s timeout and the download is tried only if it answers,
  otherwise a ``WeightsError`` names the file, where it was looked for and how to provide it.
- a path: a state dict saved with ``torch.save`` (loaded with ``weights_only=True``); torchvision ResNet keys
  (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), optionally wrapped in ``{"state_dict": ...}`` /
  ``{"model": ...}`` and/or prefixed with ``module.`` / ``backbone.``; ``fc.*`` keys are ignored.
  Missing/unexpected keys raise ``WeightsError`` naming the file and the keys.
- ``"random"``: random init, explicitly, with a loud warning.
- ``None``/empty: ``WeightsError`` saying how to provide weights.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "ModelConfig",
    "WeightsError",
    "PixelEmbeddingNet",
    "PSPHead",
    "build_model",
    "build_backbone",
    "load_backbone_weights",
    "model_signature",
    "check_signature",
    "upsample_embeddings",
    "output_size",
]


class WeightsError(RuntimeError):
    """Backbone weights missing, unreachable or not matching the backbone."""


@dataclass
class ModelConfig:
    """What defines the network. ``model_signature`` keeps the fields that change the parameter set.

    backbone: a key of ``BACKBONES``.
    embed_dim: output embedding width D (CLIP's: 512 for ViT-B/16, 768 for ViT-L/14).
    backbone_weights: ``"imagenet"``, a path, ``"random"`` (see module docstring); not part of the signature.
    psp_bins: pyramid pooling bin sizes.
    head_dim: width of the PSP fusion conv.
    dropout: dropout before the final 1x1 projection.
    input: what the backbone sees. ``rgb``: the image. ``local-contrast``: its grey level with the local mean
        removed and the local contrast divided out (:class:`LocalContrast`): no colour, and no brightness,
        absolute or relative between regions, reaches the network. Part of the signature (it changes what the
        weights mean).
    """

    backbone: str = "resnet50"
    embed_dim: int = 512
    backbone_weights: str | None = "imagenet"
    psp_bins: tuple[int, ...] = (1, 2, 3, 6)
    head_dim: int = 512
    dropout: float = 0.1
    arch: str = field(default="pspnet")
    input: str = "rgb"


#: ``ModelConfig.input`` values
INPUTS = ("rgb", "local-contrast")


class LocalContrast(nn.Module):
    """``(B,3,H,W)`` -> ``(B,3,H,W)``: the grey level (channel mean) minus its Gaussian-weighted local mean,
    divided by the local standard deviation (floor ``eps`` in the input's units), repeated on three channels.
    Parameter-free. Colour and any brightness or contrast that is constant over a region are gone; the pattern
    (edges, stripes, texture) stays. ``sigma`` in input pixels: the neighbourhood over which brightness is
    removed; a few pixels, so a region's own brightness never survives at its centre. ``eps`` (in the network's
    ImageNet-normalised units, about 6 grey levels): contrast well above it is divided out, flat areas keep their
    small noise small instead of having it raised to full contrast."""

    def __init__(self, sigma: float = 4.0, eps: float = 0.1):
        super().__init__()
        self.eps = eps
        r = int(math.ceil(3 * sigma))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        self.register_buffer("kernel", (k / k.sum()).view(1, 1, 1, -1), persistent=False)

    def _blur(self, g: torch.Tensor) -> torch.Tensor:
        r = self.kernel.shape[-1] // 2
        g = F.conv2d(F.pad(g, (r, r, 0, 0), mode="replicate"), self.kernel)
        return F.conv2d(F.pad(g, (0, 0, r, r), mode="replicate"), self.kernel.transpose(-1, -2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.float().mean(1, keepdim=True)
        d = g - self._blur(g)
        out = d / torch.sqrt(self._blur(d * d) + self.eps ** 2)
        return out.expand(-1, 3, -1, -1).to(x.dtype)


# --------------------------------------------------------------------------------------------- backbones
class ResNetBackbone(nn.Module):
    """torchvision ResNet without ``avgpool``/``fc``; the attribute names keep torchvision's state-dict keys."""

    def __init__(self, net: nn.Module, out_channels: int):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _dilate_basic_layer(layer: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Turn a stride-2 BasicBlock layer into a stride-1 layer with ``dilation`` (as torchvision does for Bottleneck)."""
    for bi, block in enumerate(layer):
        convs = [block.conv1, block.conv2]
        if bi == 0:
            block.conv1.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        for ci, conv in enumerate(convs):
            d = previous_dilation if (bi == 0 and ci == 0) else dilation
            conv.dilation = (d, d)
            conv.padding = (d, d)


def _resnet50() -> ResNetBackbone:
    import torchvision

    net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    return ResNetBackbone(net, 2048)


def _resnet18() -> ResNetBackbone:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    _dilate_basic_layer(net.layer3, 1, 2)
    _dilate_basic_layer(net.layer4, 2, 4)
    return ResNetBackbone(net, 512)


class TinyBackbone(nn.Module):
    """Four conv blocks, output stride 8, 64 channels. For CPU tests and the synthetic world only."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, stride, dil=1):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=dil, dilation=dil, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            block(3, width, 2), block(width, width, 1), block(width, 2 * width, 2),
            block(2 * width, 2 * width, 2), block(2 * width, 2 * width, 1, 2),
        )
        self.out_channels = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


#: name -> (constructor, torchvision weights enum attribute path or None)
BACKBONES: dict[str, tuple] = {
    "resnet50": (_resnet50, "ResNet50_Weights.IMAGENET1K_V1"),
    "resnet18": (_resnet18, "ResNet18_Weights.IMAGENET1K_V1"),
    "tiny": (TinyBackbone, None),
}


def _unknown_backbone(name: str) -> ValueError:
    return ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")


# ------------------------------------------------------------------------------------------------ weights
def _weights_enum(name: str):
    import torchvision.models as tvm

    enum_name, member = BACKBONES[name][1].split(".")
    return getattr(getattr(tvm, enum_name), member)


def _hub_cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _how_to(name: str) -> str:
    return (
        f"provide the backbone weights with --backbone-weights PATH (a torchvision {name} state dict, e.g. the "
        f"file torchvision downloads) or train from scratch with --backbone-weights random"
    )


def _imagenet_state_dict(name: str, *, allow_download: bool = True) -> dict:
    if BACKBONES[name][1] is None:
        raise WeightsError(f"backbone {name!r} has no ImageNet weights; use backbone_weights='random' or a PATH")
    weights = _weights_enum(name)
    url = weights.url
    cached = _hub_cache_file(url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if allow_download and _host_reachable(url):
        log.info("downloading %s ImageNet weights (%s) to %s", name, BACKBONES[name][1], cached)
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
        except Exception as exc:  # network failure mid-way, bad hash ...
            raise WeightsError(f"could not download {BACKBONES[name][1]} from {url}: {exc}; {_how_to(name)}") from exc
    raise WeightsError(
        f"ImageNet weights {BACKBONES[name][1]} for backbone {name!r} not found at {cached} and {url} is not "
        f"reachable (offline?); {_how_to(name)}"
    )


def _clean_state_dict(sd: dict) -> dict:
    for wrap in ("state_dict", "model", "backbone_state_dict"):
        if isinstance(sd, dict) and wrap in sd and isinstance(sd[wrap], dict):
            sd = sd[wrap]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc.") or not isinstance(v, torch.Tensor):
            continue
        out[k] = v
    return out


def load_backbone_weights(backbone: nn.Module, name: str, weights: str | os.PathLike | None, *,
                          allow_download: bool = True) -> str:
    """Fill ``backbone`` in place from ``weights`` (see module docstring); returns a description of the source.

    Raises ``WeightsError`` (missing file, unreachable download, key mismatch) and never blocks longer than
    the 3 s reachability probe when offline.
    """
    if weights is None or str(weights).strip() == "":
        raise WeightsError(f"no backbone weights given for {name!r}; {_how_to(name)}")
    w = str(weights)
    if w == "random":
        log.warning("=" * 72)
        log.warning("BACKBONE %s IS RANDOMLY INITIALISED (backbone_weights='random'): no ImageNet pre-training; "
                    "results will not match the paper", name)
        log.warning("=" * 72)
        return "random"
    if w == "imagenet":
        sd = _imagenet_state_dict(name, allow_download=allow_download)
        source = f"imagenet:{BACKBONES[name][1]}"
    else:
        path = Path(w).expanduser()
        if not path.is_file():
            raise WeightsError(f"backbone weights file {path} does not exist; {_how_to(name)}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"could not read backbone weights {path} (torch.load weights_only=True): {exc}") from exc
        if not isinstance(sd, dict):
            raise WeightsError(f"backbone weights {path} hold a {type(sd).__name__}, not a state dict")
        source = str(path)
    sd = _clean_state_dict(sd)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or bad_shape:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "") if keys else "none"

        raise WeightsError(
            f"backbone weights {source} do not match backbone {name!r}: missing keys [{show(missing)}]; "
            f"unexpected keys [{show(unexpected)}]; wrong shapes [{show(bad_shape)}]"
        )
    backbone.load_state_dict(sd, strict=True)
    return source


def build_backbone(name: str) -> nn.Module:
    """Randomly initialised backbone ``name`` (key of ``BACKBONES``); ``.out_channels`` gives its width."""
    if name not in BACKBONES:
        raise _unknown_backbone(name)
    return BACKBONES[name][0]()


# ------------------------------------------------------------------------------------------------- head
class PSPHead(nn.Module):
    """Pyramid pooling (bins 1,2,3,6) + 3x3 fusion conv + 1x1 projection to ``embed_dim``.

    in: ``(B, C, h, w)``; out: ``(B, embed_dim, h, w)`` (not normalised).
    """

    def __init__(self, in_ch: int, embed_dim: int, bins=(1, 2, 3, 6), head_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        red = max(in_ch // len(bins), 16)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_ch, red, 1, bias=False), nn.BatchNorm2d(red),
                          nn.ReLU(inplace=True))
            for b in bins
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(in_ch + red * len(bins), head_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(head_dim),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.proj = nn.Conv2d(head_dim, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        feats = [x] + [F.interpolate(s(x), size=(h, w), mode="bilinear", align_corners=False) for s in self.stages]
        return self.proj(self.fuse(torch.cat(feats, 1)))


class PixelEmbeddingNet(nn.Module):
    """Backbone + PSP head + per-pixel L2 normalisation.

    ``forward(x (B,3,H,W) float32) -> z (B, embed_dim, ceil(H/8), ceil(W/8)) float32``, unit norm along dim 1.
    Note: the batch norms in the pyramid pooling need more than one sample per batch in training mode
    (the trainer always feeds two views per image, so B >= 2).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        if cfg.input not in INPUTS:
            raise ValueError(f"unknown model input {cfg.input!r}; valid: {', '.join(INPUTS)}")
        self.input = LocalContrast() if cfg.input == "local-contrast" else nn.Identity()
        self.head = PSPHead(backbone.out_channels, cfg.embed_dim, tuple(cfg.psp_bins), cfg.head_dim, cfg.dropout)
        self.weights_source = "random"

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(self.input(x)))
        return F.normalize(z.float(), dim=1)

    def signature(self) -> dict:
        return model_signature(self.cfg)


def build_model(cfg: ModelConfig | None = None, *, allow_download: bool = True, **overrides) -> PixelEmbeddingNet:
    """Build the network for ``cfg`` (fields may be overridden by keyword) and load backbone weights.

    Raises ``ValueError`` for an unknown backbone/arch, ``WeightsError`` for weight problems.
    """
    cfg = cfg or ModelConfig()
    if overrides:
        cfg = ModelConfig(**{**asdict(cfg), **overrides})
    if cfg.arch != "pspnet":
        raise ValueError(f"unknown arch {cfg.arch!r}; valid: pspnet")
    if cfg.embed_dim <= 0:
        raise ValueError(f"embed_dim must be positive, got {cfg.embed_dim}")
    backbone = build_backbone(cfg.backbone)
    source = load_backbone_weights(backbone, cfg.backbone, cfg.backbone_weights, allow_download=allow_download)
    model = PixelEmbeddingNet(cfg, backbone)
    model.weights_source = source
    return model


# -------------------------------------------------------------------------------------------- signatures
def model_signature(model_cfg: ModelConfig | dict) -> dict:
    """What makes two checkpoints interchangeable: ``{arch, backbone, embed_dim, psp_bins, head_dim}``, and
    ``input`` where it is not ``rgb`` (so signatures written before it existed still match)."""
    c = asdict(model_cfg) if isinstance(model_cfg, ModelConfig) else dict(model_cfg)
    base = asdict(ModelConfig())
    extra = {"input": c["input"]} if c.get("input", "rgb") != "rgb" else {}
    return {
        "arch": c.get("arch", base["arch"]),
        "backbone": c.get("backbone", base["backbone"]),
        "embed_dim": int(c.get("embed_dim", base["embed_dim"])),
        "psp_bins": [int(b) for b in c.get("psp_bins", base["psp_bins"])],
        "head_dim": int(c.get("head_dim", base["head_dim"])),
        **extra,
    }


def check_signature(saved: dict, model_cfg: ModelConfig | dict, *, what: str = "checkpoint") -> None:
    """Raise ``ValueError`` listing the differing fields when ``saved`` (a ``model_signature``) doesn't match."""
    cur = model_signature(model_cfg)
    keys = [*cur, *(k for k in saved if k not in cur)]
    get = lambda d, k: d.get(k, "rgb" if k == "input" else None)  # noqa: E731  (absent input = rgb)
    diffs = [f"{k}: {what} has {get(saved, k)!r}, model has {get(cur, k)!r}" for k in keys if get(saved, k) != get(cur, k)]
    if diffs:
        raise ValueError(f"{what} was made for another model ({'; '.join(diffs)})")


# ---------------------------------------------------------------------------------------------- helpers
def output_size(size: int, stride: int = 8) -> int:
    """Embedding grid length for an input length ``size`` (ResNet/tiny: ``ceil(size / stride)``)."""
    return int(math.ceil(size / stride))


def upsample_embeddings(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``z (B,D,h,w)`` -> ``(B,D,H,W)`` float32, bilinear (align_corners=False) and re-normalised per pixel."""
    return F.normalize(F.interpolate(z.float(), size=tuple(size), mode="bilinear", align_corners=False), dim=1)
