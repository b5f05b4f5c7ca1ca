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

torch/torchvision are imported inside the functions (the pipeline imports torch only when needed).
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


def apply_ops(img, ops: np.ndarray, blur_kernel: int | None = None):
    """``img (3,H,W) float tensor in [0,1]`` -> same, transformed by ``ops``. ``blur_kernel``: odd kernel side
    (default ``2*ceil(3*sigma)+1``)."""
    import torchvision.transforms.v2.functional as TF

    if ops[0] > 0:
        for op in ops[5:9].astype(int).tolist():
            if op == 0 and ops[1] != 1:
                img = TF.adjust_brightness(img, float(ops[1]))
            elif op == 1 and ops[2] != 1:
                img = TF.adjust_contrast(img, float(ops[2]))
            elif op == 2 and ops[3] != 1:
                img = TF.adjust_saturation(img, float(ops[3]))
            elif op == 3 and ops[4] != 0:
                img = TF.adjust_hue(img, float(ops[4]))
    if len(ops) > 11 and ops[11] > 0:
        img = img[list(CHANNEL_PERMS[int(ops[11])])]
    if len(ops) > 12 and ops[12] > 0:
        img = 1.0 - img
    if ops[9] > 0:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if ops[10] > 0:
        sigma = float(ops[10])
        k = blur_kernel or 2 * int(np.ceil(3 * sigma)) + 1
        img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
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
