"""The synthetic world's CLIP-like teacher, and the helpers that score it.

``SyntheticTeacher``: the CLIP backend protocol (``embed_dim``, ``logit_scale``, ``dense_features``,
``encode_text``, ``info``) implemented structurally over a :class:`clips4.synthetic.world.SyntheticWorld`. It sees
only the image: each 16 x 16 patch is classified by a Gaussian naive-Bayes model on hand-made colour/texture
statistics whose class signatures are measured on pure textures of the world (the teacher "knows" what the classes
look like, as CLIP does, but not where they are). The patch embedding is the probability-weighted mix of per-class
image embeddings, then corrupted like a real dense CLIP map: a fraction of patches gets a random class (noise
seeded by the image bytes, so the teacher is deterministic), Gaussian noise is added, and the grid is blurred.
Boundaries are lost to the coarse grid; per-patch errors are not systematic, so segment-level aggregation (what
CLIP-S4 does) can beat the teacher. Text embeddings sit apart from image embeddings (a modality gap): ``text_c`` =
mostly a shared text direction plus a little of class ``c``'s own direction, so ``cos(text_c, image of c)`` is the
largest but only ~0.25. Teacher dense mIoU on the default world: about 50 % (see ``tests/test_synthetic.py``).

Corruptions beyond the default ones: ``cues`` (``all``, ``colour``, ``texture`` — colour-free gradient
statistics), ``colour_blur`` (Gaussian blur before the statistics), ``nuisance`` (a per-image random direction),
``confusion_p`` (per image, a class consistently read as another), ``patch`` (grid size), ``gap``. Every added
corruption draws from its own seeded stream, so the default teacher is unchanged.

The teacher reads its world only through the world's own methods (``render_texture``, ``class_names``, ...), so this
module imports nothing from :mod:`.world`.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["CUES", "SyntheticTeacher", "class_text_embeddings", "teacher_segmentation", "miou"]


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
    """CLIP-like backend over a :class:`~clips4.synthetic.world.SyntheticWorld` (structural implementation of the
    backend protocol).

    world: the world it reads, through ``n_classes``, ``class_names``, ``render_texture``, ``pixel_noise``, ``seed``
    and ``image_size`` only. embed_dim: D (>= n_classes + 2). noise_patch_p: fraction of patches replaced by a random class.
    noise_sigma: std of the Gaussian noise per embedding coordinate, relative to 1/sqrt(D) (i.e. noise vector norm
    ~ noise_sigma). blur: weight of the 4 neighbours in the grid blur (centre keeps 1 - 4·blur... normalised).
    """

    def __init__(self, world, embed_dim: int = 512, seed: int = 0, noise_patch_p: float = 0.4,
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
