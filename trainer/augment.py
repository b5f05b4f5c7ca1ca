"""Two augmented views per image (SimCLR set), with the cached UCM labels and CLIP map transformed alike.

Geometric transform (a crop at a random zoom — native scale by default — or the paper's random resized crop, plus a
horizontal flip) is applied identically to

- the image (crop, antialiased bilinear resize to ``S x S``, flip),
- the superpixel labels (nearest: every output pixel takes the label of the source pixel containing its
  centre), at the full ``S x S`` size and at the embedding grid ``S' x S'`` (``S' = ceil(S / stride)``),
- the CLIP feature map, resampled **directly at the embedding grid** ``S' x S'`` (bilinear on the patch grid,
  then re-normalised per position).

Coordinates (continuous, pixel ``u`` spans ``[u, u+1)``): a crop box ``(top, left, height, width)`` in the
original image; output position ``c`` of a grid of length ``n`` covering the crop maps to
``top + (c + 0.5) * height / n`` (rows; columns likewise, mirrored inside the box when flipped). The CLIP
map ``(h, w, D)`` is taken to cover the whole original image uniformly: its cell ``(i, j)`` is centred at
``((i + 0.5) * H / h, (j + 0.5) * W / w)`` (what a ViT gives for an image resized to a multiple of the patch
size). The embedding grid of the network output uses the same ``align_corners=False`` convention
(see ``clips4.trainer.model.upsample_embeddings``), so ``clip`` and ``labels_ds`` of a view line up
exactly with the model's output ``z`` for ``image``.

Photometric transforms (colour jitter in random order with p=0.8, grayscale p=0.2, Gaussian blur p=0.5; see
``clips4.pipeline.photometric``) come in two modes (``AugmentConfig.photometric``):

- ``imposed`` (SimCLR, the paper's trainer): they touch the view only; its CLIP target stays the teacher on the
  untouched image, so the student is *told* to be invariant to them, even where they erase what tells classes
  apart (hue, saturation, fine texture);
- ``teacher``: the views are made from one of the teacher's cached photometric variants of the image (or the
  image itself), chosen at random per image: the variant's transform (stored with it) is applied to the whole
  image before the crops, and the views' target is the teacher's features *on that variant*. Both views share
  the variant, so L_t (whose positives span the two views) asks for geometric invariance only. The student then
  learns the teacher's own invariances: where the teacher's reading survives a transform, so must the
  student's; where it does not, the student is not asked to be invariant.
- ``none``: no photometric transform;
- ``auto`` (the training default): ``imposed`` restricted to the transform families the teacher itself is
  measured to be invariant to (:func:`gate_by_teacher`, scores from ``clips4.pipeline.invariances``): a student
  should ignore what its teacher ignores, and nothing else.

All randomness comes from the ``torch.Generator`` (or int seed) given, so views are reproducible.
"""
from __future__ import annotations

import functools
import math
import platform
from dataclasses import make_dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clips4.pipeline.photometric import PhotometricConfig, apply_ops, sample_ops
from clips4.trainer.regions import apply_regions

__all__ = [
    "AugmentConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize_image",
    "denormalize_image",
    "sample_box",
    "resized_crop",
    "sample_zoom_box",
    "gate_by_teacher",
    "ignores_region_colour",
    "resample_labels",
    "resample_clip",
    "make_views",
    "collate_views",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _augment_fields() -> list[tuple]:
    """``AugmentConfig``'s fields: the output geometry, then every ``AugmentParams`` field with its default."""
    from dataclasses import field

    from clips4.trainer.config import AugmentParams

    out = [("size", int, field(default=321)), ("stride", int, field(default=8))]
    for name, info in AugmentParams.model_fields.items():
        out.append((name, info.annotation, field(default=info.default)))
    return out


def _photometric_config(self) -> PhotometricConfig:
    """The :class:`~clips4.pipeline.photometric.PhotometricConfig` part of this config."""
    return PhotometricConfig(**{k: getattr(self, k) for k in PhotometricConfig.model_fields})


#: A run's augmentation, resolved for making views: ``train.augment`` (clips4.trainer.config.AugmentParams: the
#: same fields and defaults, declared there) plus ``size`` (the output crop side S: 224 in tests, 321/448 real) and
#: ``stride`` (the network output stride, S' = ceil(S/stride)). ``zoom``: magnification range (log-uniform) of the
#: crop relative to the image's resolution: the box is ``S / zoom`` source pixels per side (times the aspect
#: jitter), clipped to the image; or, with ``zoom=None``, ``scale``/``ratio``: RandomResizedCrop area fraction and
#: aspect range (SimCLR uses scale (0.08, 1); segmentation views need enough shared content between the two views,
#: hence (0.25, 1) in the paper's setting). ``photometric`` / ``geometric`` ``auto`` are resolved by
#: :func:`gate_by_teacher` before views are made.
AugmentConfig = make_dataclass("AugmentConfig", _augment_fields(),
                               namespace={"photometric_config": property(_photometric_config),
                                          "__doc__": "A run's augmentation (see the comment above)."})
AugmentConfig.__module__ = __name__

#: the views :func:`make_views` makes without a config: every transform imposed at ``train.augment``'s strengths,
#: on whole views (SimCLR's; per-region transforms, ``regions``, are :mod:`clips4.trainer.regions`')
IMPOSED = {"photometric": "imposed", "geometric": "imposed", "regions": "none"}


#: AugmentConfig fields each measured teacher invariance (clips4.pipeline.invariances.FAMILIES) unlocks
_FAMILY_FIELDS = {
    "brightness_contrast": ("jitter", (0, 1)),
    "saturation": ("jitter", (2,)),
    "hue": ("jitter", (3,)),
    "grayscale": ("gray_p", None),
    "blur": ("blur_p", None),
    "palette": (("channel_shuffle_p", "invert_p"), None),
}


def ignores_region_colour(scores: dict[str, float], threshold: float) -> bool:
    """Whether the teacher is measured to ignore each region's colour and brightness (family ``local_recolour`` of
    ``invariances.json`` at least ``threshold``): what ``train.augment.regions: auto`` and ``train.input: auto``
    (clips4.trainer.train.model_input) decide on."""
    return scores.get("local_recolour", 0.0) >= threshold


def gate_by_teacher(cfg: "AugmentConfig", scores: dict[str, float], threshold: float) -> tuple["AugmentConfig", list[str]]:
    """``photometric='auto'`` / ``geometric='auto'``: the imposed views with every transform family the teacher is
    not invariant to switched off.

    ``scores``: ``{family: score}`` from the prototypes stage's ``invariances.json``; a family is kept when its
    score is at least ``threshold``. Photometric families gate the colour jitter, grayscale, blur and palette
    fields (nothing kept -> ``photometric='none'``); ``flip`` gates ``flip_p`` and ``zoom`` the zoom range (or the
    area crops) — not kept: crops at native scale. Returns the config to train with (no ``auto`` left) and the
    names of the families kept."""
    kept: list[str] = []
    changes: dict = {}
    if cfg.photometric == "auto":
        kept += [f for f in _FAMILY_FIELDS if scores.get(f, 0.0) >= threshold]
        jitter = list(cfg.jitter)
        for fam, (field, idx) in _FAMILY_FIELDS.items():
            if fam in kept:
                continue
            if field == "jitter":
                for i in idx:
                    jitter[i] = 0.0
            else:
                for f in (field if isinstance(field, tuple) else (field,)):
                    changes[f] = 0.0
        changes.update(jitter=tuple(jitter), photometric="imposed" if kept else "none")
    if cfg.geometric == "auto":
        if scores.get("flip", 0.0) >= threshold:
            kept.append("flip")
        else:
            changes["flip_p"] = 0.0
        if scores.get("zoom", 0.0) >= threshold:
            kept.append("zoom")
        else:
            changes.update(zoom=(1.0, 1.0), scale=None)
        changes["geometric"] = "imposed"
    if cfg.regions == "auto":  # per-region recolouring (clips4.trainer.regions), family ``local_recolour``
        on = ignores_region_colour(scores, threshold)
        if on:
            kept.append("regions")
        changes["regions"] = "imposed" if on else "none"
    return AugmentConfig(**{**cfg.__dict__, **changes}), kept


def _gen(rng) -> torch.Generator:
    if isinstance(rng, torch.Generator):
        return rng
    g = torch.Generator()
    g.manual_seed(int(rng) if rng is not None else 0)
    return g


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g).item())


def normalize_image(image) -> torch.Tensor:
    """``(H,W,3) uint8`` array/tensor or ``(3,H,W)`` float in [0,1] -> ``(3,H,W) float32`` ImageNet-normalised."""
    t = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if t.dtype == torch.uint8:
        t = t.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (t.float() - mean) / std


def denormalize_image(x: torch.Tensor) -> np.ndarray:
    """Inverse of ``normalize_image``: ``(3,H,W)`` -> ``(H,W,3) uint8`` (for visualisation)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (((x.cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def sample_box(height: int, width: int, g: torch.Generator, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop box ``(top, left, h, w)`` (ints, inside the image), torchvision's algorithm."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        ar = math.exp(_uniform(g, *log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return top, left, h, w
    # fallback: central crop with the ratio clamped (as torchvision)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@functools.cache
def _native_uint8_resize_on_cpu() -> bool:
    """Whether this CPU has torch's native uint8 antialiased bilinear kernel (AVX2/AVX-512, ARM), asked once: it
    is the same for every view."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resized_crop(img: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """``(C, H, W) uint8`` -> ``(C, size, size) uint8``: the box (inside the image) resized bilinearly with
    antialiasing, ``align_corners=False``. torchvision's ``resized_crop(..., antialias=True)``: the native uint8
    kernel where torchvision uses it (CPU with AVX2/AVX-512, ARM), else float32 then rounded."""
    crop = img[..., top:top + h, left:left + w]
    if crop.shape[-2:] == (size, size):
        return crop
    native = img.device.type == "cpu" and _native_uint8_resize_on_cpu()
    x = crop.unsqueeze(0) if native else crop.unsqueeze(0).float()
    out = F.interpolate(x, size=[size, size], mode="bilinear", align_corners=False, antialias=True)[0]
    return out if native else out.round_().to(torch.uint8)


def sample_zoom_box(height: int, width: int, size: int, g: torch.Generator, zoom=(1.0, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop box ``(top, left, h, w)`` whose resize to ``size x size`` magnifies the image by a factor drawn
    log-uniformly from ``zoom`` (aspect jitter from ``ratio``, log-uniform); a box larger than the image is clipped
    to it (the view then magnifies more along that side)."""
    f = math.exp(_uniform(g, math.log(zoom[0]), math.log(zoom[1])))
    ar = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
    h = min(height, max(1, int(round(size / f / math.sqrt(ar)))))
    w = min(width, max(1, int(round(size / f * math.sqrt(ar)))))
    top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
    left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
    return top, left, h, w


def _centres(start: float, length: float, n: int, flip: bool = False) -> np.ndarray:
    """Continuous source coordinates of the centres of ``n`` output cells covering ``[start, start+length)``."""
    c = (np.arange(n) + 0.5) * (length / n)
    if flip:
        c = length - c
    return start + c


def resample_labels(labels: np.ndarray, box, out_hw: tuple[int, int], flip: bool = False) -> np.ndarray:
    """Nearest resampling of ``labels (H,W)`` inside ``box=(top,left,h,w)`` to ``out_hw``: each output cell
    takes the label of the source pixel containing its centre. Returns int64 ``out_hw``."""
    top, left, h, w = box
    H, W = labels.shape
    ys = np.clip(np.floor(_centres(top, h, out_hw[0])).astype(np.int64), 0, H - 1)
    xs = np.clip(np.floor(_centres(left, w, out_hw[1], flip)).astype(np.int64), 0, W - 1)
    return np.asarray(labels)[ys[:, None], xs[None, :]].astype(np.int64)


def resample_clip(clip, image_hw: tuple[int, int], box, out_hw: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """Bilinear resampling of the CLIP map ``clip (h,w,D)`` (covering the whole ``image_hw`` image) at the centres
    of an ``out_hw`` grid over ``box``; re-normalised. Returns ``(D, *out_hw) float32``.

    Outside the outermost cell centres the border value is repeated (``padding_mode='border'``).
    """
    t = torch.as_tensor(np.asarray(clip)).float()
    gh, gw = t.shape[:2]
    H, W = image_hw
    top, left, h, w = box
    ys = _centres(top, h, out_hw[0]) * (gh / H)  # in grid units, cell i centred at i + 0.5
    xs = _centres(left, w, out_hw[1], flip) * (gw / W)
    # grid_sample, align_corners=False: normalised -1..1 spans the full extent [0, g) of the grid
    ny = torch.as_tensor(ys / gh * 2 - 1, dtype=torch.float32)
    nx = torch.as_tensor(xs / gw * 2 - 1, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ny, nx, indexing="ij")[::-1], -1)[None]  # (1, oh, ow, 2) as (x, y)
    out = F.grid_sample(t.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(out[0], dim=0)


def _photometric(img: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """img ``(3,S,S) float [0,1]`` -> same, colour-jittered / grayscaled / blurred."""
    k = max(3, int(round(cfg.size * 0.1)) | 1)  # SimCLR: kernel 10% of the image side, odd
    return apply_ops(img, sample_ops(cfg.photometric_config, g), blur_kernel=k)


def make_views(image: np.ndarray, labels: np.ndarray, clip: np.ndarray | None, *, size: int | None = None,
               rng=0, cfg: AugmentConfig | None = None, n_views: int = 2,
               variants: np.ndarray | None = None, variant_ops: np.ndarray | None = None) -> list[dict]:
    """Two (``n_views``) augmented views of one image.

    Args:
        image: ``(H,W,3) uint8``.
        labels: ``(H,W)`` int (UCM superpixel ids; negative = ignore, kept as is).
        clip: ``(h,w,D)`` float16/float32 CLIP patch features of the ORIGINAL image, covering it uniformly;
            ``None`` to skip.
        size: output side S (overrides ``cfg.size``).
        rng: ``torch.Generator`` or int seed.
        variants, variant_ops: ``(V,h,w,D)`` the teacher's features on V photometric variants of the image and
            ``(V,OPS)`` their transforms (``photometric='teacher'``; without them every view uses the image).
    Returns: list of dicts with
        ``image (3,S,S) float32`` ImageNet-normalised; ``labels (S,S) int64``; ``labels_ds (S',S') int64``;
        ``clip (D,S',S') float32`` unit-norm (absent when ``clip`` is None); ``box (top,left,h,w)`` ints in
        original pixels; ``flip`` bool. ``S' = ceil(S / cfg.stride)``.
    """
    cfg = cfg or AugmentConfig(**IMPOSED)
    S = int(size or cfg.size)
    if S != cfg.size:
        cfg = AugmentConfig(**{**cfg.__dict__, "size": S})
    g = _gen(rng)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H,W,3) uint8, got {image.shape} {image.dtype}")
    H, W = image.shape[:2]
    if labels.shape != (H, W):
        raise ValueError(f"labels shape {labels.shape} differs from image shape {(H, W)}")
    Sd = int(math.ceil(S / cfg.stride))
    img_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # uint8 (3,H,W)
    # geometry of all views first, so it does not depend on the photometric settings
    geo = []
    for _ in range(n_views):
        if cfg.zoom is not None:
            box = sample_zoom_box(H, W, S, g, cfg.zoom, cfg.ratio)
        else:
            box = sample_box(H, W, g, cfg.scale or (0.25, 1.0), cfg.ratio)
        geo.append((box, bool(torch.rand((), generator=g).item() < cfg.flip_p)))
    src, target = img_t, clip
    if variants is not None and cfg.photometric == "teacher" and len(variants):
        # one variant (0 = the image itself) for all views of the image: L_t's cross-view positives then ask for
        # geometric invariance only, never for invariance to a transform the teacher itself is not invariant to
        u = int(torch.randint(0, len(variants) + 1, (1,), generator=g).item())
        if u:
            src = (apply_ops(img_t.float() / 255.0, variant_ops[u - 1]) * 255).round().byte()
            target = variants[u - 1]
    views = []
    for box, flip in geo:
        top, left, h, w = box
        crop = resized_crop(src, top, left, h, w, S).float() / 255.0
        if flip:
            crop = crop.flip(-1)
        if "auto" in (cfg.photometric, cfg.geometric, cfg.regions):
            raise ValueError("photometric/geometric/regions 'auto' must be resolved with gate_by_teacher() before "
                             "making views")
        if cfg.regions == "imposed":  # every superpixel recoloured on its own
            crop = apply_regions(crop, resample_labels(labels, box, (S, S), flip), g)
        if cfg.photometric == "imposed":
            crop = _photometric(crop, cfg, g)
        v = {
            "image": normalize_image(crop),
            "labels": torch.from_numpy(resample_labels(labels, box, (S, S), flip)),
            "labels_ds": torch.from_numpy(resample_labels(labels, box, (Sd, Sd), flip)),
            "box": box,
            "flip": flip,
        }
        if target is not None:
            v["clip"] = resample_clip(target, (H, W), box, (Sd, Sd), flip)
        views.append(v)
    return views


def collate_views(items: list[list[dict]]) -> dict:
    """Batch ``[make_views(...) for each image]`` -> dict of tensors with ``N = n_images * n_views`` rows, view-major
    per image (row ``i * n_views + v``):

    ``image (N,3,S,S)``, ``labels (N,S,S)``, ``labels_ds (N,S',S')``, ``clip (N,D,S',S')`` (if present),
    ``image_index (N,) int64`` (which image of the batch a row comes from — what ``CLIPS4Loss`` needs to match
    superpixel ids across the two views), ``box (N,4) int64``, ``flip (N,) bool``.
    """
    rows = [v for views in items for v in views]
    out = {
        "image": torch.stack([v["image"] for v in rows]),
        "labels": torch.stack([v["labels"] for v in rows]),
        "labels_ds": torch.stack([v["labels_ds"] for v in rows]),
        "image_index": torch.tensor([i for i, views in enumerate(items) for _ in views], dtype=torch.int64),
        "box": torch.tensor([list(v["box"]) for v in rows], dtype=torch.int64),
        "flip": torch.tensor([v["flip"] for v in rows], dtype=torch.bool),
    }
    if all("clip" in v for v in rows):
        out["clip"] = torch.stack([v["clip"] for v in rows])
    return out
