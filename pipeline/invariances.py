"""Which photometric transforms the teacher is invariant to, measured on a sample of the training images.

The student should be invariant to a transform exactly when its teacher is: views transformed on the student's
side only (the paper's SimCLR set) tell it to ignore what the transform changes, which is right for a teacher
that reads shape and texture (CLIP on photographs, mostly) and wrong for one whose classes differ by colour
levels — then the student merges those classes (docs/results.md, the synthetic sweep). ``train.augment.photometric:
auto`` imposes only the families measured here as invariant.

Per family (``FAMILIES``) the teacher runs on each sampled image transformed by that family's probes (at the
strength the augmentation would use at most), and every feature cell's class — the nearest prototype — is
compared with the cell's class on the image itself. The same comparison on an imperceptibly perturbed image
(±1 grey level of noise) is the baseline: it is 1 for a deterministic teacher and the teacher's own
self-consistency for a noisy one. ``score = agreement(family) / agreement(baseline)``, in ``[0, ~1]``.

``local_recolour`` probes a transform per region: each cell of a random partition gets its own random colour,
brightness and texture gain and polarity (:mod:`clips4.pipeline.regions`), which changes colour and luminance,
absolute and between regions; only feature cells inside one probe cell are compared. A teacher that reads
texture keeps its reading, one that reads colour does not. ``train.augment.regions: auto``
(clips4.trainer.regions) imposes the recolouring on the student's views only where it passes.

numpy in, numpy out; torch only through :mod:`clips4.pipeline.photometric`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from clips4.pipeline.photometric import IDENTITY, OPS_FIELDS, apply_ops_uint8

__all__ = ["FAMILIES", "LOCAL", "probe_ops", "local_probe", "measure_invariances", "passes_per_image"]

#: prefix of the per-region family: the cells of a random partition transformed each on its own
#: (``train.augment.regions: auto`` imposes the per-region recolouring only where it passes)
LOCAL = "local_"
#: cells of the per-region probes' partition (2 rows of blocks, cut at random)
LOCAL_CELLS = 6
#: family -> what it changes; the probes below use the augmentation's largest strengths
FAMILIES = {
    "brightness_contrast": "brightness and contrast x0.6 / x1.4",
    "saturation": "saturation x0.6 / x1.4",
    "hue": "hue shift -0.1 / +0.1 of the colour wheel",
    "grayscale": "grey levels only",
    "blur": "Gaussian blur, sigma 2 px",
    "palette": "RGB channels permuted / inverted (edges and texture kept)",
    "flip": "horizontal flip (features flipped back)",
    "zoom": "image rescaled x0.7 / x1.4 (features resampled back to the grid)",
    # per region: each cell of a random partition of the image recoloured on its own (clips4.pipeline.regions)
    f"{LOCAL}recolour": "every region its own random colour, brightness, texture gain and polarity",
}
#: the geometric probes' rescale factors (``train.augment.zoom`` under ``geometric: auto`` is used only when the
#: teacher is invariant at these)
ZOOM_PROBES = (0.7, 1.4)


def _op(**kw) -> np.ndarray:
    """The identity transform with the named ``OPS_FIELDS`` set (colour jitter switched on when a factor is)."""
    o = IDENTITY.copy()
    for k, v in kw.items():
        o[OPS_FIELDS.index(k)] = v
    if any(k in kw for k in ("brightness", "contrast", "saturation", "hue")):
        o[0] = 1
    return o


def probe_ops() -> dict[str, list[np.ndarray]]:
    """``{family: [ops vectors]}``: the fixed transforms each family is probed with."""
    return {
        "brightness_contrast": [_op(brightness=0.6, contrast=1.4), _op(brightness=1.4, contrast=0.6)],
        "saturation": [_op(saturation=0.6), _op(saturation=1.4)],
        "hue": [_op(hue=-0.1), _op(hue=0.1)],
        "grayscale": [_op(gray=1)],
        "blur": [_op(blur_sigma=2.0)],
        "palette": [_op(channel_perm=3), _op(invert=1), _op(channel_perm=4, invert=1)],
    }


def _classes(feats: np.ndarray, protos: np.ndarray) -> np.ndarray:
    f = np.asarray(feats, np.float32)
    return np.argmax(f.reshape(-1, f.shape[-1]) @ protos.T, axis=1)


def _resize(img: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    H, W = img.shape[:2]
    size = (max(1, round(W * factor)), max(1, round(H * factor)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def _to_grid(feats: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``(h', w', D)`` features covering the image -> ``(h, w, D)``: each target cell takes the source cell under its
    centre (both grids cover the whole image)."""
    h2, w2 = feats.shape[:2]
    ys = np.minimum(((np.arange(hw[0]) + 0.5) / hw[0] * h2).astype(int), h2 - 1)
    xs = np.minimum(((np.arange(hw[1]) + 0.5) / hw[1] * w2).astype(int), w2 - 1)
    return feats[ys[:, None], xs[None, :]]


def _geometric(backend, img: np.ndarray, name: str, hw: tuple[int, int]) -> list[np.ndarray]:
    """The teacher's features on the geometric probes of ``name``, mapped back onto the ``hw`` grid."""
    if name == "flip":
        return [backend.dense_features([np.ascontiguousarray(img[:, ::-1])])[0][:, ::-1]]
    return [_to_grid(backend.dense_features([_resize(img, f)])[0], hw) for f in ZOOM_PROBES]


def passes_per_image() -> int:
    """Teacher forward passes the measurement costs per image: the image, its ±1-grey-level twin, every
    photometric probe, the flip, the zooms and the per-region recolouring."""
    return 2 + sum(len(ops) for ops in probe_ops().values()) + 1 + len(ZOOM_PROBES) + 1


def local_probe(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with every cell of a random partition (:data:`LOCAL_CELLS` axis-aligned blocks) recoloured on its
    own (:func:`clips4.pipeline.regions.recolour_regions`): colour and luminance, absolute and between regions,
    change. Returns the image and the ``(H, W)`` cell ids."""
    from clips4.pipeline.regions import recolour_regions

    H, W = img.shape[:2]
    ny = 2 if LOCAL_CELLS % 2 == 0 else 1
    ys = np.sort(rng.choice(np.arange(1, H), ny - 1, replace=False)) if ny > 1 else np.array([], int)
    xs = np.sort(rng.choice(np.arange(1, W), LOCAL_CELLS // ny - 1, replace=False))
    cells = np.searchsorted(ys, np.arange(H), side="right")[:, None] * (LOCAL_CELLS // ny) \
        + np.searchsorted(xs, np.arange(W), side="right")[None, :]
    out = recolour_regions(img.astype(np.float32) / 255.0, cells, rng)
    return (out * 255).round().astype(np.uint8), cells


def _inside(cells: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``(h*w,) bool``: the feature cells (a ``hw`` grid covering the image) whose pixels all lie in one probe cell
    (those only are compared: a cell cut by a probe boundary sees a new edge, not a change of colour)."""
    H, W = cells.shape
    h, w = hw
    out = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            blk = cells[i * H // h:max((i + 1) * H // h, i * H // h + 1), j * W // w:max((j + 1) * W // w, j * W // w + 1)]
            out[i, j] = blk.min() == blk.max()
    return out.reshape(-1)


def measure_invariances(backend, images: list[np.ndarray], protos: np.ndarray, seed: int = 0,
                        progress: Callable[[int], None] | None = None) -> dict:
    """Scores of every family (see the module docstring) over ``images`` (``(H,W,3) uint8``), the cell classes
    read as the nearest of ``protos`` ``(L, D)`` (unit-norm). Returns ``{"families": {name: score}, "baseline":
    agreement, "images": n}``; an empty image list gives no scores. ``progress(k)`` is called after each image
    (k images done): the measurement costs :func:`passes_per_image` teacher passes per image."""
    protos = np.asarray(protos, np.float32)
    if not images or len(protos) == 0:
        return {"families": {}, "baseline": None, "images": 0}
    rng = np.random.default_rng(seed)
    local_rng = np.random.default_rng([seed, 17])  # own stream: the global probes' draws are unchanged
    probes = probe_ops()
    agree = {name: [] for name in FAMILIES}
    base = []
    for done, img in enumerate(images, 1):
        f0 = backend.dense_features([img])[0]
        ref = _classes(f0, protos)
        jitter = rng.integers(-1, 2, img.shape)
        nudged = np.clip(img.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
        base.append(float(np.mean(_classes(backend.dense_features([nudged])[0], protos) == ref)))
        for name, ops in probes.items():
            for o in ops:
                out = _classes(backend.dense_features([apply_ops_uint8(img, o)])[0], protos)
                agree[name].append(float(np.mean(out == ref)) if out.shape == ref.shape else 0.0)
        for name in ("flip", "zoom"):
            for f in _geometric(backend, img, name, f0.shape[:2]):
                agree[name].append(float(np.mean(_classes(f, protos) == ref)))
        probed, cells = local_probe(img, local_rng)
        out = _classes(backend.dense_features([probed])[0], protos)
        keep = _inside(cells, f0.shape[:2]) if out.shape == ref.shape else np.zeros(0, bool)
        if keep.any():
            agree[LOCAL + "recolour"].append(float(np.mean(out[keep] == ref[keep])))
        elif out.shape != ref.shape:
            agree[LOCAL + "recolour"].append(0.0)
        if progress is not None:
            progress(done)
    b = max(float(np.mean(base)), 1e-6)
    return {"families": {k: round(float(np.mean(v)) / b, 4) for k, v in agree.items() if v}, "baseline": round(b, 4),
            "images": len(images)}
