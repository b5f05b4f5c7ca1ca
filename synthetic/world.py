"""A synthetic world to test that the method *learns*: textured-class images with exact masks, and a noisy,
coarse CLIP-like teacher.

``SyntheticWorld``: images made of a few irregular regions (warped Voronoi cells), each filled with the texture of
one class. Classes come in colour pairs that differ only by texture (horizontal vs vertical stripes, dots vs
checker, ...), so the class is a property of texture, not only of colour. ``write(root, n_train, n_val)`` lays
out ``images/<split>/<id>.png``, ``masks/<split>/<id>.png`` (uint8 class ids, no ignore pixels) and
``classes.txt`` (one name per line).

``SyntheticTeacher``: the CLIP backend protocol (``embed_dim``, ``logit_scale``, ``dense_features``,
``encode_text``, ``info``) implemented structurally. It sees only the image: each 16 x 16 patch is classified by
a Gaussian naive-Bayes model on hand-made colour/texture statistics whose class signatures are measured on
pure textures of the world (the teacher "knows" what the classes look like, as CLIP does, but not where they
are). The patch embedding is the probability-weighted mix of per-class image embeddings, then corrupted like
a real dense CLIP map: a fraction of patches gets a random class (noise seeded by the image bytes, so the
teacher is deterministic), Gaussian noise is added, and the grid is blurred. Boundaries are lost to the
coarse grid; per-patch errors are not systematic, so segment-level aggregation (what CLIP-S4 does) can beat
the teacher. Text embeddings sit apart from image embeddings (a modality gap): ``text_c`` = mostly a shared
text direction plus a little of class ``c``'s own direction, so ``cos(text_c, image of c)`` is the largest
but only ~0.25. Teacher dense mIoU on the default world: about 50 % (see ``tests/test_synthetic.py``).

A family of worlds (``WORLDS``, ``world_from_preset``, ``class_family``): explicit or generated class lists
(colour and texture similarity, near-duplicates), region shapes (``warped`` default, ``voronoi``, ``boxes``) and
counts, and ``spurious_colour`` (each class's own colours in train — in a share ``spurious_p`` of the regions —
a random class's palette per region in val/test; ``spurious_specs``: texture classes whose hue, luminance or both
are the spurious cue), ``context_groups`` (each train image draws its classes from one group, val/test from all);
``sample_with_cues`` also gives the class whose colours each pixel wears. Teacher corruptions beyond the default ones: ``cues`` (``all``, ``colour``, ``texture`` — colour-free
gradient statistics), ``colour_blur`` (Gaussian blur before the statistics), ``nuisance`` (a per-image random
direction), ``confusion_p`` (per image, a class consistently read as another), ``patch`` (grid size), ``gap``.
Every added corruption draws from its own seeded stream, so the default world and teacher are unchanged.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CLASS_SPECS", "WORLDS", "class_family", "spurious_specs", "world_from_preset", "make_teacher", "SyntheticWorld", "SyntheticTeacher", "class_text_embeddings", "teacher_segmentation", "miou"]


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

    def teacher(self, **kwargs) -> "SyntheticTeacher":
        return SyntheticTeacher(self, **kwargs)


# ------------------------------------------------------------------------------------------------ teacher
def _patch_stats(img: np.ndarray, patch: int) -> np.ndarray:
    """``(H,W,3) uint8`` with H, W multiples of ``patch`` -> ``(h,w,8) float32`` colour/texture statistics."""
    x = img.astype(np.float32) / 255.0
    H, W = x.shape[:2]
    h, w = H // patch, W // patch
    g = x.mean(2)
    dx = np.zeros_like(g)
    dy = np.zeros_like(g)
    dd = np.zeros_like(g)
    dx[:, :-1] = np.abs(g[:, 1:] - g[:, :-1])
    dy[:-1] = np.abs(g[1:] - g[:-1])
    dd[:-1, :-1] = np.abs(g[1:, 1:] - g[:-1, :-1])

    def pool(a):
        return a.reshape(h, patch, w, patch, *a.shape[2:]).mean((1, 3))

    mean = pool(x)  # (h,w,3)
    std = np.sqrt(np.maximum(pool(g ** 2) - pool(g) ** 2, 0))
    return np.concatenate([mean, std[..., None], pool(dx)[..., None], pool(dy)[..., None], pool(dd)[..., None],
                           (pool(dx) - pool(dy))[..., None]], -1)


def _texture_stats(img: np.ndarray, patch: int) -> np.ndarray:
    """Colour-free texture statistics: ``(H,W,3) uint8`` -> ``(h,w,4) float32`` — the share of horizontal, vertical
    and diagonal gradient energy, and mean |gradient| / std (frequency), all invariant to the colour pair."""
    f = _patch_stats(img, patch)
    std, dx, dy, dd = f[..., 3], f[..., 4], f[..., 5], f[..., 6]
    tot = dx + dy + dd + 1e-3
    return np.stack([dx / tot, dy / tot, dd / tot, (dx + dy) / (2 * std + 1e-2)], -1)


#: teacher cues -> which statistics its patch classifier reads
CUES = ("all", "colour", "texture")


def _hash_seed(*parts) -> int:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return int.from_bytes(h.digest()[:8], "little")


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))


class SyntheticTeacher:
    """CLIP-like backend over a :class:`SyntheticWorld` (structural implementation of the backend protocol).

    embed_dim: D (>= n_classes + 2). noise_patch_p: fraction of patches replaced by a random class.
    noise_sigma: std of the Gaussian noise per embedding coordinate, relative to 1/sqrt(D) (i.e. noise vector norm
    ~ noise_sigma). blur: weight of the 4 neighbours in the grid blur (centre keeps 1 - 4·blur... normalised).
    """

    def __init__(self, world: SyntheticWorld, embed_dim: int = 512, seed: int = 0, noise_patch_p: float = 0.4,
                 noise_sigma: float = 1.0, blur: float = 0.6, nb_temperature: float = 1.0, gap: float = 0.35,
                 logit_scale: float = 100.0, *, patch: int = 16, cues: str = "all", colour_blur: float = 0.0,
                 nuisance: float = 0.0, confusion_p: float = 0.0):
        if embed_dim < world.n_classes + 2:
            raise ValueError(f"embed_dim must be >= n_classes + 2 = {world.n_classes + 2}")
        if cues not in CUES:
            raise ValueError(f"cues must be one of {CUES}, got {cues!r}")
        self.world = world
        self.patch = int(patch)
        self.cues = cues
        #: Gaussian blur (sigma, px) of the image before the patch statistics
        self.colour_blur = float(colour_blur)
        #: norm of a per-image random direction added to every embedding of that image
        self.nuisance = float(nuisance)
        #: per image, each class is mislabelled as one other class (consistently, all its patches) with this chance
        self.confusion_p = float(confusion_p)
        self.embed_dim = int(embed_dim)
        self.logit_scale = float(logit_scale)
        self.seed = int(seed)
        self.noise_patch_p = float(noise_patch_p)
        self.noise_sigma = float(noise_sigma)
        self.blur = float(blur)
        self.nb_temperature = float(nb_temperature)
        self.gap = float(gap)
        rng = np.random.default_rng([self.seed, 12345])
        q, _ = np.linalg.qr(rng.normal(size=(self.embed_dim, world.n_classes + 2)))
        q = q.T.astype(np.float32)  # orthonormal rows
        self.g_img, self.g_txt, self.r = q[0], q[1], q[2:]
        # image embeddings of the classes: shared "image" direction + own direction (pairwise cos ~0.5)
        self.class_embeddings = _norm(0.7 * self.g_img[None] + 0.7 * self.r)
        self._fit_signatures(rng)
        self._templates = None

    # ----------------------------------------------------------------------------- patch classifier
    def _fit_signatures(self, rng: np.random.Generator) -> None:
        """Mean/std of the patch statistics of each class, measured on pure rendered textures."""
        mus, sds = [], []
        shape = (8 * self.patch, 8 * self.patch)
        for c in range(self.world.n_classes):
            feats = []
            for _ in range(4):
                img = self.world.render_texture(c, shape, rng) + rng.normal(0, self.world.pixel_noise, shape + (3,))
                f = self._features(np.clip(img, 0, 255).round().astype(np.uint8))
                feats.append(f.reshape(-1, f.shape[-1]))
            f = np.concatenate(feats)
            mus.append(f.mean(0))
            sds.append(f.std(0))
        self.sig_mu = np.stack(mus).astype(np.float32)
        # pooled per-feature std (floor avoids over-confident zero-variance features)
        self.sig_sd = np.maximum(np.stack(sds), 0.02).astype(np.float32)

    def patch_probabilities(self, image: np.ndarray) -> np.ndarray:
        """``(H,W,3) uint8`` -> ``(h,w,n_classes)`` naive-Bayes class probabilities per patch (before corruption)."""
        f = self._features(self._fit_grid(image))  # (h,w,F)
        z = (f[..., None, :] - self.sig_mu) / self.sig_sd  # (h,w,C,F)
        ll = -0.5 * (z ** 2).sum(-1) - np.log(self.sig_sd).sum(-1)
        ll = ll / self.nb_temperature
        ll -= ll.max(-1, keepdims=True)
        p = np.exp(ll)
        return p / p.sum(-1, keepdims=True)

    def _features(self, img: np.ndarray) -> np.ndarray:
        """Patch statistics the classifier reads (by ``cues``): ``(H,W,3) uint8`` -> ``(h,w,F) float32``."""
        if self.colour_blur > 0:
            from PIL import Image, ImageFilter

            img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(self.colour_blur)))
        if self.cues == "texture":
            return _texture_stats(img, self.patch)
        f = _patch_stats(img, self.patch)
        return f[..., :3] if self.cues == "colour" else f

    def _fit_grid(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H,W,3) uint8, got {image.shape} {image.dtype}")
        H, W = image.shape[:2]
        h, w = H // self.patch, W // self.patch
        if h < 1 or w < 1:
            raise ValueError(f"image {H}x{W} smaller than one {self.patch}px patch")
        if (H, W) != (h * self.patch, w * self.patch):  # the grid must cover the whole image
            image = _resize(image, (h * self.patch, w * self.patch))
        return image

    # ------------------------------------------------------------------------------------ protocol
    def dense_features(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """``[(H,W,3) uint8]`` -> ``[(H//16, W//16, D) float32]`` unit-norm; cell (i, j) covers the image uniformly
        (images whose sides are not multiples of 16 are resized to ``16h x 16w`` first)."""
        out = []
        for image in images:
            p = self.patch_probabilities(image)  # (h,w,C)
            h, w, C = p.shape
            rng = np.random.default_rng(_hash_seed(self.seed, np.ascontiguousarray(image).tobytes()))
            flip = rng.uniform(size=(h, w)) < self.noise_patch_p
            rand_cls = rng.integers(0, C, (h, w))
            p = np.where(flip[..., None], np.eye(C, dtype=np.float32)[rand_cls], p)
            extra = None
            if self.confusion_p > 0 or self.nuisance > 0:  # own stream: the default teacher's noise is unchanged
                extra = np.random.default_rng(_hash_seed("corrupt", self.seed, np.ascontiguousarray(image).tobytes()))
            if self.confusion_p > 0:
                to = np.arange(C)
                hit = extra.uniform(size=C) < self.confusion_p
                to[hit] = (np.arange(C)[hit] + extra.integers(1, C, hit.sum())) % C
                p = p @ np.eye(C, dtype=np.float32)[to]  # class c's mass goes to to[c]
            e = p @ self.class_embeddings  # (h,w,D)
            if self.nuisance > 0:
                d = extra.normal(size=self.embed_dim).astype(np.float32)
                e = _norm(e) + self.nuisance * d / np.linalg.norm(d)
            e = _norm(e) + rng.normal(0, self.noise_sigma / np.sqrt(self.embed_dim), e.shape)
            e = _blur_grid(e, self.blur)
            out.append(_norm(e).astype(np.float32))
        return out

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """``[str]`` -> ``(N,D) float32`` unit-norm. A text naming a class (prompt template filled with a class name,
        or containing the name as a word) -> ``normalize(gap·r_c + 0.94·g_text + small text-specific noise)``;
        other texts -> the text direction plus a random direction seeded by the text."""
        names = self.world.class_names
        lookup = self._template_lookup()
        out = []
        for t in texts:
            key = t.strip().lower()
            c = lookup.get(key)
            if c is None:
                words = set(key.replace(".", " ").replace(",", " ").split())
                hits = [i for i, n in enumerate(names) if n.lower() in words]
                c = hits[0] if len(hits) == 1 else None
            rng = np.random.default_rng(_hash_seed("text", self.seed, key))
            noise = rng.normal(size=self.embed_dim).astype(np.float32)
            noise /= np.linalg.norm(noise)
            if c is None:
                v = 0.94 * self.g_txt + self.gap * noise
            else:
                v = self.gap * self.r[c] + 0.94 * self.g_txt + 0.08 * noise
            out.append(v)
        return _norm(np.stack(out)).astype(np.float32) if out else np.zeros((0, self.embed_dim), np.float32)

    def _template_lookup(self) -> dict:
        if self._templates is None:
            try:
                from clips4.data import prompt_templates

                templates = prompt_templates()
            except Exception:  # pragma: no cover - bundled data missing
                templates = ["a photo of a {}."]
            self._templates = {
                t.format(n).strip().lower(): c for c, n in enumerate(self.world.class_names) for t in templates + ["{}"]
            }
        return self._templates

    def info(self) -> dict:
        return {
            "name": "synthetic",
            "weights": f"synthetic-world{self.world.seed}-teacher{self.seed}",
            "sha256": None,
            "variant": f"{self.world.n_classes}cls-{self.world.image_size[0]}x{self.world.image_size[1]}",
            "grid": f"patch{self.patch}",
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "patch": self.patch,
            "seed": self.seed,
            "n_classes": self.world.n_classes,
            "world_seed": self.world.seed,
            "noise_patch_p": self.noise_patch_p,
            "noise_sigma": self.noise_sigma,
            "blur": self.blur,
            "cues": self.cues,
            "colour_blur": self.colour_blur,
            "nuisance": self.nuisance,
            "confusion_p": self.confusion_p,
            "gap": self.gap,
        }


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _blur_grid(e: np.ndarray, a: float) -> np.ndarray:
    """Mix each cell with its 4 neighbours (weight ``a/4`` each, edge replicated): ``(h,w,D)`` -> same."""
    if a <= 0:
        return e
    p = np.pad(e, ((1, 1), (1, 1), (0, 0)), mode="edge")
    nb = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    return (1 - a) * e + (a / 4) * nb


# ------------------------------------------------------------------------------------------- evaluation
def class_text_embeddings(teacher: SyntheticTeacher, class_names: list[str] | None = None,
                          templates: list[str] | None = None) -> np.ndarray:
    """``(n, D)`` unit-norm class text embeddings: mean over prompt ``templates`` (default: the 85), normalised."""
    names = class_names or teacher.world.class_names
    if templates is None:
        from clips4.data import prompt_templates

        templates = prompt_templates()
    key = (tuple(names), tuple(templates))
    cache = teacher.__dict__.setdefault("_class_text_cache", {})
    if key not in cache:
        cache[key] = np.stack([_norm(teacher.encode_text([t.format(n) for t in templates]).mean(0)) for n in names])
    return cache[key]


def teacher_segmentation(teacher: SyntheticTeacher, image: np.ndarray, class_names: list[str] | None = None,
                         templates: list[str] | None = None) -> np.ndarray:
    """Teacher's own dense prediction: features upsampled bilinearly to the image size, each pixel -> nearest class
    text embedding (mean over ``templates``, default: all 85). Returns ``(H,W) int64``."""
    import torch
    import torch.nn.functional as F

    T = class_text_embeddings(teacher, class_names, templates)
    f = torch.from_numpy(teacher.dense_features([image])[0]).permute(2, 0, 1)[None]
    up = F.interpolate(f, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    return (torch.from_numpy(T) @ up.flatten(1)).argmax(0).view(image.shape[:2]).numpy().astype(np.int64)


def miou(preds: list[np.ndarray], gts: list[np.ndarray], n_classes: int) -> float:
    """Mean IoU over classes present in the ground truth or predictions (accumulated confusion)."""
    conf = np.zeros((n_classes, n_classes), np.int64)
    for p, g in zip(preds, gts):
        ok = (g >= 0) & (g < n_classes)
        conf += np.bincount(g[ok] * n_classes + p[ok], minlength=n_classes ** 2).reshape(n_classes, n_classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


PATTERNS = ["hstripes", "vstripes", "dots", "checker", "noise", "diag", "waves", "grid", "speckle", "flat"]


def class_family(n_classes: int, *, colour_similarity: float = 0.0, texture_similarity: float = 0.0,
                 near_duplicates: int = 0, duplicate_shift: float = 14.0, seed: int = 0) -> list[ClassSpec]:
    """A generated class list. ``colour_similarity`` 0..1: 0 = hues spread round the wheel, 1 = one hue for all.
    ``texture_similarity`` 0..1: below 0.5 every class has its own pattern; from 0.5 all share horizontal stripes
    whose periods get closer as it rises (at 1 only colour tells classes apart). ``near_duplicates``: the last
    that many classes copy the first ones, colours shifted by ``duplicate_shift`` (RGB units) and period x1.5."""
    import colorsys

    rng = np.random.default_rng([seed, 777])
    n_base = n_classes - near_duplicates
    if n_base < 1 or near_duplicates < 0:
        raise ValueError(f"near_duplicates must be in 0..{n_classes - 1}, got {near_duplicates}")
    base_hue = rng.uniform()
    ratio = 1 + 1.5 * (1 - texture_similarity)
    out = []
    for i in range(n_base):
        hue = (base_hue + (1 - colour_similarity) * i / n_base) % 1
        fg = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.75, 0.8))
        bg = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.3, 0.95))
        if texture_similarity < 0.5:
            pattern, period = PATTERNS[i % len(PATTERNS)], float(rng.uniform(6, 10))
        else:
            pattern, period = "hstripes", 4.0 * ratio ** (i % 4)
        out.append(ClassSpec(f"{pattern}{i}", pattern, fg, bg, period))
    for j in range(near_duplicates):
        b = out[j % n_base]
        shift = lambda c: tuple(int(np.clip(v + duplicate_shift, 0, 255)) for v in c)  # noqa: E731
        out.append(ClassSpec(f"{b.pattern}{n_base + j}", b.pattern, shift(b.fg), shift(b.bg), b.period * 1.5))
    return out


_YELLOWS = [  # three distinct classes + three yellows that differ mostly in texture frequency
    ClassSpec("brick", "hstripes", (200, 60, 50), (235, 225, 215), 6.0),
    ClassSpec("grass", "noise", (60, 160, 60), (30, 90, 30), 1.0),
    ClassSpec("sky", "flat", (120, 180, 230), (150, 200, 240), 64.0),
    ClassSpec("straw", "hstripes", (235, 205, 60), (170, 140, 30), 3.0),
    ClassSpec("corn", "hstripes", (225, 200, 45), (160, 130, 25), 7.0),
    ClassSpec("sand", "hstripes", (240, 215, 75), (180, 150, 40), 16.0),
]
_ORIENTED = [  # texture is the class; each class has its own colours in train only
    ClassSpec("hbars", "hstripes", (200, 60, 50), (235, 225, 215), 6.0),
    ClassSpec("vbars", "vstripes", (40, 70, 200), (230, 210, 70), 6.0),
    ClassSpec("diagonal", "diag", (60, 160, 60), (225, 240, 220), 7.0),
    ClassSpec("checks", "checker", (130, 60, 160), (225, 215, 235), 8.0),
    ClassSpec("spots", "dots", (90, 90, 90), (240, 240, 240), 8.0),
    ClassSpec("ripples", "waves", (200, 120, 30), (30, 30, 60), 10.0),
]

def spurious_specs(cue: str, n_classes: int = 6, contrast: float = 0.3, seed: int = 0) -> list[ClassSpec]:
    """Texture classes (oriented stripes, waves, checks: the class is the texture) whose colours carry a ``cue`` that
    a texture-reading teacher ignores: ``hue`` (hues round the wheel at one luminance), ``luminance`` (one hue,
    class-tied brightness from dark to light), ``hue-luminance`` (both, paired at random), ``none`` (one colour for
    all). fg / bg = the class colour x (1 +- ``contrast``). With ``SyntheticWorld(spurious_colour=True)`` the cue
    holds in train (with ``spurious_p``) and is shuffled in val / test."""
    import colorsys

    if cue not in ("hue", "luminance", "hue-luminance", "none"):
        raise ValueError(f"cue must be hue, luminance, hue-luminance or none, got {cue!r}")
    patterns = ["hstripes", "vstripes", "diag", "adiag", "waves", "checker", "dots", "grid"]
    if not 2 <= n_classes <= len(patterns):
        raise ValueError(f"n_classes must be in 2..{len(patterns)}, got {n_classes}")
    rng = np.random.default_rng([seed, 991])
    h0 = rng.uniform()
    lumas = np.linspace(40, 130, n_classes)[rng.permutation(n_classes)]
    out = []
    for i in range(n_classes):
        hue = (h0 + i / n_classes) % 1 if cue in ("hue", "hue-luminance") else h0
        sat = 0.5 if cue in ("hue", "hue-luminance") else (0.35 if cue == "luminance" else 0.0)
        rgb = np.array(colorsys.hsv_to_rgb(hue, sat, 1.0))
        luma = lumas[i] if cue in ("luminance", "hue-luminance") else 90.0  # no channel clipped
        base = rgb * luma / float(rgb @ np.array([0.299, 0.587, 0.114]))
        fg = tuple(int(v) for v in np.clip(base * (1 + contrast), 0, 255))
        bg = tuple(int(v) for v in np.clip(base * (1 - contrast), 0, 255))
        out.append(ClassSpec(f"{patterns[i]}{i}", patterns[i], fg, bg, 6.0 if i < 4 else 9.0))
    return out


#: the trap worlds' teacher: texture only (colour- and contrast-free gradient statistics), moderately noisy
_TEXTURE_TEACHER = {"cues": "texture", "noise_patch_p": 0.2, "noise_sigma": 0.8}
#: context: two near-identical textures (horizontal stripes, periods 6 and 8) each seen in train only beside its own
#: companion (dots / checks), apart at evaluation; colour carries nothing
_CONTEXT = [
    ClassSpec("hbars", "hstripes", (150, 150, 150), (80, 80, 80), 6.0),
    ClassSpec("dots", "dots", (150, 150, 150), (80, 80, 80), 8.0),
    ClassSpec("wide-hbars", "hstripes", (150, 150, 150), (80, 80, 80), 8.0),
    ClassSpec("checks", "checker", (150, 150, 150), (80, 80, 80), 8.0),
    ClassSpec("vbars", "vstripes", (150, 150, 150), (80, 80, 80), 6.0),
]

#: Named worlds of the sweep (``benchmarks/synthetic_world.py --sweep``): SyntheticWorld kwargs (``world``) and
#: SyntheticTeacher kwargs (``teacher``). They span class similarity (near-duplicates, one hue, one texture),
#: region shapes and sizes, and teacher corruptions; none is tuned to the method.
WORLDS: dict[str, dict] = {
    "default": {"world": {"n_classes": 6}, "teacher": {}},
    "voronoi-yellows": {"world": {"specs": _YELLOWS, "region_shape": "voronoi"},
                        "teacher": {"cues": "colour", "colour_blur": 3.0, "noise_patch_p": 0.1, "noise_sigma": 2.0,
                                    "nuisance": 0.6}},
    "yellows-confusions": {"world": {"specs": _YELLOWS, "region_shape": "voronoi"},
                           "teacher": {"cues": "colour", "colour_blur": 3.0, "noise_patch_p": 0.1, "noise_sigma": 2.0,
                                       "nuisance": 0.6, "confusion_p": 0.15}},
    "spurious-colour": {"world": {"specs": _ORIENTED, "spurious_colour": True},
                        "teacher": {"cues": "texture", "noise_patch_p": 0.3, "noise_sigma": 1.0}},
    "colour-cue": {"world": {"specs": class_family(6, texture_similarity=1.0, seed=1)},
                   "teacher": {"cues": "colour", "noise_patch_p": 0.4, "noise_sigma": 1.5}},
    "near-duplicates": {"world": {"specs": class_family(7, near_duplicates=2, seed=2), "region_shape": "boxes"},
                        "teacher": {"noise_patch_p": 0.3, "noise_sigma": 1.5, "nuisance": 0.4}},
    "one-hue": {"world": {"specs": class_family(6, colour_similarity=0.9, seed=3)},
                "teacher": {"noise_patch_p": 0.4, "noise_sigma": 1.0, "gap": 0.2}},
    "many-small": {"world": {"n_classes": 10, "regions": (6, 12)},
                   "teacher": {"noise_patch_p": 0.3, "noise_sigma": 1.0, "gap": 0.15}},
    "coarse-grid": {"world": {"n_classes": 6, "region_shape": "voronoi"},
                    "teacher": {"patch": 32, "blur": 0.8, "noise_patch_p": 0.3, "colour_blur": 1.5}},
    # the trap: a texture-reading teacher, a cue it ignores tied to the class in train (100 % / 80 % of the regions)
    # and shuffled in val / test
    **{f"spurious-{cue}{'' if p == 1 else '-80'}": {
        "world": {"specs": spurious_specs(cue, seed=7), "spurious_colour": True, "spurious_p": p},
        "teacher": dict(_TEXTURE_TEACHER)}
        for cue in ("hue", "luminance", "hue-luminance") for p in (1.0, 0.8)},
    "spurious-context": {"world": {"specs": _CONTEXT, "region_shape": "voronoi", "context_groups": [[0, 1], [2, 3, 4]]},
                         "teacher": dict(_TEXTURE_TEACHER)},
}


def world_from_preset(world: str | dict | None = None, image_size=(96, 128), seed: int = 0,
                      **world_params) -> tuple[SyntheticWorld, dict]:
    """``(SyntheticWorld, teacher kwargs)`` of a named world (``WORLDS``) or a ``{"world":..., "teacher":...}`` dict;
    ``world_params`` override the world's kwargs (e.g. ``n_classes`` for the default world)."""
    if world is None or isinstance(world, str):
        name = world or "default"
        if name not in WORLDS:
            raise ValueError(f"unknown synthetic world {name!r}; valid: {', '.join(WORLDS)}")
        world = WORLDS[name]
    kw = {**world.get("world", {}), **world_params}
    return SyntheticWorld(image_size=tuple(image_size), seed=seed, **kw), dict(world.get("teacher", {}))


def make_teacher(n_classes: int = 6, image_size: tuple[int, int] | list[int] = (96, 128), world_seed: int = 0,
                 world: str | None = None, **teacher_params) -> SyntheticTeacher:
    """Backend factory for configs: ``clip.backend: clips4.pipeline.synthetic:make_teacher`` with
    ``backend_params`` naming the world (``world`` a name of ``WORLDS``, or ``n_classes`` for the default one;
    ``image_size``, ``world_seed``) and the teacher's params (over the named world's own)."""
    if world is None:
        w, preset = SyntheticWorld(n_classes=n_classes, image_size=tuple(image_size), seed=world_seed), {}
    else:
        w, preset = world_from_preset(world, image_size, world_seed)
    return w.teacher(**{**preset, **teacher_params})
