"""Photometric transforms as explicit parameter vectors, shared by the trainer's augmentation and the
clip_features stage's cached teacher variants.

A transform is a ``(OPS,) float32`` vector (see ``OPS_FIELDS``): whether colour jitter applies, the brightness,
contrast, saturation and hue factors, the order of those four (a permutation of 0..3), grayscale (0/1), the
Gaussian blur sigma in pixels of the image it is applied to (0 = none), a permutation of the RGB channels (index
into ``CHANNEL_PERMS``, 0 = none) and inversion (0/1). The last two scramble the colour palette while keeping
every edge and texture: cached as teacher variants they show the student what a teacher that reads texture, not
colour, does when colours change (off in the SimCLR set). The vector, not a seed, is what the
clip_features cache stores next to each variant's features, so the trainer replays exactly the transform the
teacher saw, whatever its own settings.

torch is imported inside the functions (the pipeline imports torch only when needed). The colour operations are
torchvision's tensor kernels (``transforms.v2.functional``: the same formulas, the same float operations, tests
check equality), written with torch alone: importing torchvision imports ``torch._dynamo`` (through
``torchvision.ops``), about 3 s of every training process's 6 s start-up, for five small functions.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from clips4.pipeline.config import FloatPair, FloatQuad, Strict

__all__ = ["teacher_variants", "PhotometricConfig", "VARIANT_DEFAULTS", "OPS_FIELDS", "CHANNEL_PERMS", "sample_ops", "apply_ops", "apply_ops_uint8",
           "IDENTITY"]

OPS_FIELDS = ("jitter", "brightness", "contrast", "saturation", "hue", "o0", "o1", "o2", "o3", "gray", "blur_sigma",
              "channel_perm", "invert")
#: the transform that changes nothing
IDENTITY = np.array([0, 1, 1, 1, 0, 0, 1, 2, 3, 0, 0, 0, 0], np.float32)
#: RGB channel orders, ``channel_perm`` indexes this (0 = unchanged)
CHANNEL_PERMS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


class PhotometricConfig(Strict):
    """The photometric transforms and their strengths: SimCLR's set (colour jitter in random order with
    probability ``jitter_p``, grayscale with ``gray_p``, Gaussian blur with ``blur_p``, sigma uniform in
    ``blur_sigma``) and, beyond it, a random non-identity RGB channel permutation with ``channel_shuffle_p`` and
    inversion with ``invert_p``.

    The one declaration of these parameters: ``train.augment`` (clips4.trainer.config.AugmentParams) is this
    model plus the crop geometry and the modes, and the clip_features stage's teacher variants
    (``variant_params``) are built from it too (see :data:`VARIANT_DEFAULTS`)."""

    #: colour jitter factors: brightness, contrast, saturation, hue
    jitter: FloatQuad = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = Field(default=0.8, ge=0, le=1)
    gray_p: float = Field(default=0.2, ge=0, le=1)
    blur_p: float = Field(default=0.5, ge=0, le=1)
    blur_sigma: FloatPair = (0.1, 2.0)
    #: beyond SimCLR's set: a random RGB channel permutation / inversion with these probabilities (colour-palette
    #: scrambles that keep every edge and texture)
    channel_shuffle_p: float = Field(default=0.5, ge=0, le=1)
    invert_p: float = Field(default=0.25, ge=0, le=1)


#: the teacher variants' transforms where ``clip_features.variant_params`` does not set them: SimCLR's set, so the
#: palette scrambles are off (the other fields: :class:`PhotometricConfig`'s defaults)
VARIANT_DEFAULTS = {"channel_shuffle_p": 0.0, "invert_p": 0.0}


def _u(g, lo: float, hi: float) -> float:
    import torch

    return float(lo + (hi - lo) * torch.rand((), generator=g).item())


def sample_ops(cfg: PhotometricConfig, g) -> np.ndarray:
    """One random transform drawn with ``torch.Generator`` ``g`` -> ``(OPS,) float32``. The draw order is that of
    the trainer's original augmentation (jitter?, its order, its factors, gray?, blur?, sigma), so a seeded
    run keeps its views."""
    import torch

    ops = IDENTITY.copy()
    if torch.rand((), generator=g).item() < cfg.jitter_p:
        ops[0] = 1
        b, c, s, hue = cfg.jitter
        order = torch.randperm(4, generator=g).tolist()
        ops[5:9] = order
        for op in order:
            if op == 0 and b > 0:
                ops[1] = _u(g, max(0.0, 1 - b), 1 + b)
            elif op == 1 and c > 0:
                ops[2] = _u(g, max(0.0, 1 - c), 1 + c)
            elif op == 2 and s > 0:
                ops[3] = _u(g, max(0.0, 1 - s), 1 + s)
            elif op == 3 and hue > 0:
                ops[4] = _u(g, -hue, hue)
    if torch.rand((), generator=g).item() < cfg.gray_p:
        ops[9] = 1
    if torch.rand((), generator=g).item() < cfg.blur_p:
        ops[10] = _u(g, *cfg.blur_sigma)
    # drawn only when enabled, so the SimCLR set keeps its random stream (and seeded runs their views)
    if cfg.channel_shuffle_p > 0 and torch.rand((), generator=g).item() < cfg.channel_shuffle_p:
        ops[11] = 1 + int(torch.randint(0, len(CHANNEL_PERMS) - 1, (1,), generator=g).item())
    if cfg.invert_p > 0 and torch.rand((), generator=g).item() < cfg.invert_p:
        ops[12] = 1
    return ops


def _luma(img):
    """``(..., 3, H, W)`` float -> ``(..., 1, H, W)``: ITU-R 601 luma, torchvision's grayscale weights."""
    r, g, b = img.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(img, other, ratio: float):
    return img.mul(ratio).add_(other, alpha=1.0 - ratio).clamp_(0, 1)


def adjust_brightness(img, factor: float):
    """``(..., 3, H, W)`` float in [0, 1] scaled by ``factor`` (torchvision's ``adjust_brightness``)."""
    return img.mul(factor).clamp_(0, 1)


def adjust_contrast(img, factor: float):
    """Blend with the image's mean luma (torchvision's ``adjust_contrast``)."""
    import torch

    return _blend(img, torch.mean(_luma(img), dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(img, factor: float):
    """Blend with the image's luma per pixel (torchvision's ``adjust_saturation``)."""
    return _blend(img, _luma(img), factor)


def _rgb_to_hsv(img):
    import torch

    r, g, _ = img.unbind(dim=-3)
    minc, maxc = torch.aminmax(img, dim=-3)
    eqc = maxc == minc  # grey pixels: hue and saturation 0 without a division by zero
    rng = maxc - minc
    ones = torch.ones_like(maxc)
    s = rng / torch.where(eqc, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(-3) - img) / torch.where(eqc, ones, rng).unsqueeze(-3)).unbind(dim=-3)
    not_r = maxc != r
    is_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(is_g & not_r)
    hr = bc.sub_(gc).mul_(~not_r)
    hb = gc.add_(4.0).sub_(rc).mul_(not_r.logical_and_(is_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(img):
    import torch

    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long,
                          device=img.device)[:, i]
    if select.ndim > 3:
        select = select.moveaxis(0, -3)
    return vpqt.gather(-3, select)


def adjust_hue(img, factor: float):
    """Rotate the hue by ``factor`` turns, ``factor`` in [-0.5, 0.5] (torchvision's ``adjust_hue``)."""
    import torch

    h, s, v = _rgb_to_hsv(img).unbind(dim=-3)
    h.add_(factor).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def rgb_to_grayscale(img):
    """Luma in all three channels (torchvision's ``rgb_to_grayscale(num_output_channels=3)``)."""
    return _luma(img).expand(img.shape)


def gaussian_blur(img, kernel: int, sigma: float):
    """``(3, H, W)`` float blurred by a ``kernel x kernel`` Gaussian, reflect padding (torchvision's
    ``gaussian_blur``, including its kernel: samples at ``linspace(-lim, lim)``, ``lim = (k-1) / (2 sqrt 2)``)."""
    import math

    import torch
    import torch.nn.functional as F

    lim = (kernel - 1) / (2.0 * math.sqrt(2.0))
    k1 = torch.softmax(torch.linspace(-lim, lim, steps=kernel, dtype=img.dtype, device=img.device)
                       .div(sigma).pow(2).neg(), dim=0)
    k2 = (k1.unsqueeze(-1) * k1).expand(img.shape[-3], 1, kernel, kernel)
    pad = kernel // 2
    out = F.pad(img.unsqueeze(0), [pad, pad, pad, pad], mode="reflect")
    return F.conv2d(out, k2, groups=img.shape[-3])[0]


def apply_ops(img, ops: np.ndarray, blur_kernel: int | None = None):
    """``img (3,H,W) float tensor in [0,1]`` -> same, transformed by ``ops``. ``blur_kernel``: odd kernel side
    (default ``2*ceil(3*sigma)+1``)."""
    if ops[0] > 0:
        for op in ops[5:9].astype(int).tolist():
            if op == 0 and ops[1] != 1:
                img = adjust_brightness(img, float(ops[1]))
            elif op == 1 and ops[2] != 1:
                img = adjust_contrast(img, float(ops[2]))
            elif op == 2 and ops[3] != 1:
                img = adjust_saturation(img, float(ops[3]))
            elif op == 3 and ops[4] != 0:
                img = adjust_hue(img, float(ops[4]))
    if len(ops) > 11 and ops[11] > 0:
        img = img[list(CHANNEL_PERMS[int(ops[11])])]
    if len(ops) > 12 and ops[12] > 0:
        img = 1.0 - img
    if ops[9] > 0:
        img = rgb_to_grayscale(img)
    if ops[10] > 0:
        sigma = float(ops[10])
        k = blur_kernel or 2 * int(np.ceil(3 * sigma)) + 1
        img = gaussian_blur(img, k, sigma)
    return img.clamp(0, 1)


def apply_ops_uint8(image: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """``(H,W,3) uint8`` -> ``(H,W,3) uint8`` transformed by ``ops`` (what the teacher variants are computed on)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    return (apply_ops(t, ops) * 255).round().byte().permute(1, 2, 0).numpy()


def teacher_variants(backend, image: np.ndarray, image_id: str, params) -> dict[str, np.ndarray]:
    """The teacher on ``params.photometric_variants`` photometric variants of ``image`` (clip_features params).

    Returns ``{"variant_features": (h,w,V,D) float16, "variant_ops": (V,OPS) float32}``; variant ``v``'s transform
    is drawn from a generator seeded by (params.seed, image_id, v), so it does not depend on batching.
    """
    import hashlib

    import torch

    cfg = PhotometricConfig(**{**VARIANT_DEFAULTS, **params.variant_params})
    feats, ops = [], []
    for v in range(params.photometric_variants):
        g = torch.Generator()
        g.manual_seed(int.from_bytes(hashlib.sha256(f"{params.seed}/{image_id}/{v}".encode()).digest()[:7], "little"))
        o = sample_ops(cfg, g)
        f = backend.dense_features([apply_ops_uint8(image, o)])[0]
        feats.append(f.astype(np.float16))
        ops.append(o)
    return {"variant_features": np.stack(feats, 2), "variant_ops": np.stack(ops).astype(np.float32)}
