"""The synthetic world's images: textured-class images with exact masks.

``SyntheticWorld``: images made of a few irregular regions (warped Voronoi cells, plain Voronoi cells or boxes),
each filled with the texture of one class. Classes come in colour pairs that differ only by texture (horizontal vs
vertical stripes, dots vs checker, ...), so the class is a property of texture, not only of colour.
``write(root, n_train, n_val)`` lays out ``images/<split>/<id>.png``, ``masks/<split>/<id>.png`` (uint8 class ids,
no ignore pixels) and ``classes.txt`` (one name per line). ``spurious_colour`` (each class's own colours in train —
in a share ``spurious_p`` of the regions — a random class's palette per region in val/test) and ``context_groups``
(each train image draws its classes from one group, val/test from all) make the trap worlds of
:mod:`clips4.synthetic.presets`; ``sample_with_cues`` also gives the class whose colours each pixel wears.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clips4.synthetic.teacher import SyntheticTeacher

__all__ = ["ClassSpec", "CLASS_SPECS", "SyntheticWorld"]


@dataclass(frozen=True)
class ClassSpec:
    name: str
    pattern: str  # hstripes, vstripes, dots, checker, noise, flat, diag, waves, grid, speckle
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]
    period: float


#: Up to 10 classes; consecutive pairs share colours where noted, so texture matters.
CLASS_SPECS: list[ClassSpec] = [
    ClassSpec("stripes", "hstripes", (200, 60, 50), (235, 225, 215), 6.0),
    ClassSpec("bars", "vstripes", (200, 60, 50), (235, 225, 215), 6.0),  # same colours as stripes
    ClassSpec("dots", "dots", (40, 70, 200), (230, 210, 70), 8.0),
    ClassSpec("checker", "checker", (40, 70, 200), (230, 210, 70), 8.0),  # same colours as dots
    ClassSpec("grass", "noise", (60, 160, 60), (30, 90, 30), 1.0),
    ClassSpec("sky", "flat", (120, 180, 230), (150, 200, 240), 64.0),
    ClassSpec("zigzag", "diag", (130, 60, 160), (225, 215, 235), 7.0),
    ClassSpec("waves", "waves", (130, 60, 160), (225, 215, 235), 10.0),  # same colours as zigzag
    ClassSpec("mesh", "grid", (90, 90, 90), (20, 20, 20), 8.0),
    ClassSpec("sand", "speckle", (200, 170, 120), (140, 100, 60), 1.0),
]


def _field(pattern: str, period: float, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture intensity in [0,1] (1 = fg colour) at coordinates yy, xx (float arrays)."""
    ph = rng.uniform(0, period)
    if pattern == "hstripes":
        return (np.sin(2 * np.pi * (yy + ph) / period) > 0).astype(np.float32)
    if pattern == "vstripes":
        return (np.sin(2 * np.pi * (xx + ph) / period) > 0).astype(np.float32)
    if pattern == "diag":
        return (np.sin(2 * np.pi * (xx + yy + ph) / (period * 1.414)) > 0).astype(np.float32)
    if pattern == "adiag":
        return (np.sin(2 * np.pi * (xx - yy + ph) / (period * 1.414)) > 0).astype(np.float32)
    if pattern == "waves":
        return (np.sin(2 * np.pi * (yy + 2.5 * np.sin(2 * np.pi * xx / (3 * period)) + ph) / period) > 0).astype(np.float32)
    if pattern == "dots":
        py = (yy + ph) % period - period / 2
        px = (xx + rng.uniform(0, period)) % period - period / 2
        return ((py ** 2 + px ** 2) < (period * 0.3) ** 2).astype(np.float32)
    if pattern == "checker":
        a = np.floor((yy + ph) / (period / 2)) + np.floor((xx + rng.uniform(0, period)) / (period / 2))
        return (a % 2).astype(np.float32)
    if pattern == "grid":
        a = ((yy + ph) % period < 1.5) | ((xx + rng.uniform(0, period)) % period < 1.5)
        return a.astype(np.float32)
    if pattern == "noise":
        return rng.uniform(0, 1, yy.shape).astype(np.float32)
    if pattern == "speckle":
        return (rng.uniform(0, 1, yy.shape) < 0.25).astype(np.float32)
    if pattern == "flat":
        return (0.5 + 0.5 * np.sin(2 * np.pi * (yy * 0.7 + xx * 0.3 + ph) / (period * 2))).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


class SyntheticWorld:
    """Generator of textured-class images with ground-truth masks. Deterministic per (seed, split, index).

    n_classes: 2..10 (the first ``n_classes`` of ``CLASS_SPECS``); image_size: (H, W).
    """

    SPLITS = {"train": 0, "val": 1, "test": 2}

    REGION_SHAPES = ("warped", "voronoi", "boxes")

    def __init__(self, n_classes: int = 6, image_size: tuple[int, int] = (96, 128), seed: int = 0,
                 regions: tuple[int, int] = (3, 7), pixel_noise: float = 8.0, *,
                 specs: list[ClassSpec] | None = None, region_shape: str = "warped", spurious_colour: bool = False,
                 spurious_p: float = 1.0, context_groups: list[list[int]] | None = None):
        if specs is None:
            if not 2 <= n_classes <= len(CLASS_SPECS):
                raise ValueError(f"n_classes must be in 2..{len(CLASS_SPECS)}, got {n_classes}")
            specs = CLASS_SPECS[: int(n_classes)]
        specs = [s if isinstance(s, ClassSpec) else ClassSpec(**s) for s in specs]
        if len(specs) < 2:
            raise ValueError(f"a world needs >= 2 classes, got {len(specs)}")
        if region_shape not in self.REGION_SHAPES:
            raise ValueError(f"region_shape must be one of {self.REGION_SHAPES}, got {region_shape!r}")
        self.n_classes = len(specs)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.regions = tuple(regions)
        self.pixel_noise = float(pixel_noise)
        self.specs = list(specs)
        self.region_shape = region_shape
        #: colour is class-correlated in train but drawn from a random class's palette per region elsewhere
        self.spurious_colour = bool(spurious_colour)
        #: spurious worlds: the chance that a train region wears its own class's palette (else a random class's)
        if not 0.0 <= float(spurious_p) <= 1.0:
            raise ValueError(f"spurious_p must be in 0..1, got {spurious_p}")
        self.spurious_p = float(spurious_p)
        #: context worlds: each train image draws its classes from one of these groups (val/test from all classes),
        #: so in training a class is only ever seen next to the classes of its group
        self.context_groups = [list(map(int, g)) for g in context_groups] if context_groups else None
        if self.context_groups and any(len(g) < 2 or min(g) < 0 or max(g) >= self.n_classes
                                       for g in self.context_groups):
            raise ValueError(f"context_groups must hold >= 2 class ids in 0..{self.n_classes - 1} each")

    @property
    def class_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def _rng(self, split: str, index: int) -> np.random.Generator:
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(self.SPLITS)}")
        return np.random.default_rng([self.seed, self.SPLITS[split], int(index)])

    def render_texture(self, c: int, shape: tuple[int, int], rng: np.random.Generator,
                       palette: int | None = None) -> np.ndarray:
        """Class ``c``'s texture over a whole ``shape`` canvas: ``(H,W,3) float32`` in 0..255 (before noise).
        ``palette``: take the colours of that class instead of ``c``'s own (spurious-colour worlds)."""
        s = self.specs[c]
        col = self.specs[c if palette is None else palette]
        H, W = shape
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        t = _field(s.pattern, s.period, yy, xx, rng)[..., None]
        gain = rng.uniform(0.9, 1.1)  # per-region illumination
        img = (t * np.array(col.fg, np.float32) + (1 - t) * np.array(col.bg, np.float32)) * gain
        return img

    def region_map(self, rng: np.random.Generator, group: list[int] | None = None) -> np.ndarray:
        """``(H,W) int64`` class id per pixel: warped Voronoi cells, each given a random class (>= 2 classes;
        ``group``: classes drawn from it only)."""
        H, W = self.image_size
        n = int(rng.integers(self.regions[0], self.regions[1] + 1))
        if self.region_shape == "boxes":
            if group is not None:
                raise ValueError("context_groups need Voronoi regions (region_shape warped or voronoi)")
            return self._boxes(n, rng)
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        wy, wx = yy.copy(), xx.copy()
        for _ in range(3 if self.region_shape == "warped" else 0):  # smooth random warp so boundaries are curvy and not grid aligned
            f = rng.uniform(0.02, 0.06, 2)
            ph = rng.uniform(0, 2 * np.pi, 2)
            amp = rng.uniform(3, 8)
            wy += amp * np.sin(f[0] * xx + ph[0])
            wx += amp * np.sin(f[1] * yy + ph[1])
        seeds = rng.uniform([0, 0], [H, W], (n, 2)).astype(np.float32)
        d = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
        cell = d.argmin(0)
        classes = rng.integers(0, self.n_classes, n)
        while len(np.unique(classes[np.unique(cell)])) < 2:
            classes = rng.integers(0, self.n_classes, n)
        if group is not None:  # context worlds, train: the cells take the classes of one group only
            pick = np.random.default_rng([self.seed, 4242, int(rng.integers(2 ** 31))])
            while True:
                classes = np.asarray(group)[pick.integers(0, len(group), n)]
                if len(np.unique(classes[np.unique(cell)])) >= 2:
                    break
        return classes[cell].astype(np.int64)

    def _boxes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Axis-aligned rectangles: the canvas cut by ``n - 1`` random guillotine splits, one class per piece."""
        H, W = self.image_size
        boxes = [(0, 0, H, W)]
        while len(boxes) < n:
            i = int(np.argmax([b[2] * b[3] for b in boxes]))  # split the largest piece
            y, x, h, w = boxes.pop(i)
            if h >= w:
                c = int(rng.integers(max(1, h // 4), max(2, h - h // 4)))
                boxes += [(y, x, c, w), (y + c, x, h - c, w)]
            else:
                c = int(rng.integers(max(1, w // 4), max(2, w - w // 4)))
                boxes += [(y, x, h, c), (y, x + c, h, w - c)]
        classes = rng.integers(0, self.n_classes, len(boxes))
        while len(np.unique(classes)) < 2:
            classes = rng.integers(0, self.n_classes, len(boxes))
        out = np.zeros((H, W), np.int64)
        for (y, x, h, w), c in zip(boxes, classes):
            out[y:y + h, x:x + w] = c
        return out

    def sample(self, index: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` of ``split``: ``(image (H,W,3) uint8, mask (H,W) int64 class ids)``."""
        img, mask, _ = self.sample_with_cues(index, split)
        return img, mask

    def sample_with_cues(self, index: int, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`sample` plus ``(H,W) int64`` the class whose colours each pixel wears (its own class's but where a
        spurious-colour world shuffles them): what a student that reads colour instead of texture would predict."""
        rng = self._rng(split, index)
        group = None
        if self.context_groups and split == "train":  # own stream: worlds without groups are unchanged
            g = np.random.default_rng([self.seed, self.SPLITS[split], int(index), 4241])
            group = self.context_groups[int(g.integers(0, len(self.context_groups)))]
        mask = self.region_map(rng, group)
        img = np.zeros(self.image_size + (3,), np.float32)
        worn = mask.copy()
        corr = None
        if self.spurious_colour and split == "train" and self.spurious_p < 1:  # own stream, as above
            corr = np.random.default_rng([self.seed, self.SPLITS[split], int(index), 4243])
        for c in np.unique(mask):
            palette = None
            if self.spurious_colour and split != "train":  # test: colours no longer tell the class
                palette = int(rng.integers(0, self.n_classes))
            elif corr is not None and corr.uniform() >= self.spurious_p:  # train: the cue holds with spurious_p
                palette = int(corr.integers(0, self.n_classes))
            tex = self.render_texture(int(c), self.image_size, rng, palette)
            img[mask == c] = tex[mask == c]
            if palette is not None:
                worn[mask == c] = palette
        img += rng.normal(0, self.pixel_noise, img.shape)
        return np.clip(img, 0, 255).round().astype(np.uint8), mask, worn

    def write(self, root: str | os.PathLike, n_train: int, n_val: int, n_test: int = 0) -> dict:
        """Write ``images/<split>/<id>.png``, ``masks/<split>/<id>.png`` (uint8 class ids) and ``classes.txt``.

        Ids are zero-padded indices (``000007``). Returns ``{split: n_images, "root": str, "classes": [...]}``.
        """
        from PIL import Image

        root = Path(root)
        out = {"root": str(root), "classes": self.class_names}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            if n <= 0:
                continue
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, mask = self.sample(i, split)
                Image.fromarray(img).save(root / "images" / split / f"{i:06d}.png")
                Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / split / f"{i:06d}.png")
            out[split] = n
        (root / "classes.txt").write_text("\n".join(self.class_names) + "\n")
        return out

    def teacher(self, **kwargs) -> SyntheticTeacher:
        """This world's CLIP-like teacher with ``kwargs``."""
        return SyntheticTeacher(self, **kwargs)
