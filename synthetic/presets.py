"""The family of synthetic worlds: generated class lists and the named worlds of the sweep.

``class_family``: explicit or generated class lists (colour and texture similarity, near-duplicates);
``spurious_specs``: texture classes whose hue, luminance or both are a spurious cue; ``WORLDS``: the named worlds
(``benchmarks/synthetic_world.py --sweep``), each a pair of :class:`~clips4.synthetic.world.SyntheticWorld` and
:class:`~clips4.synthetic.teacher.SyntheticTeacher` kwargs; ``world_from_preset`` builds one; ``make_teacher`` is
the backend factory that configs name (``clip.backend: clips4.synthetic:make_teacher``).
"""
from __future__ import annotations

import numpy as np

from clips4.synthetic.teacher import SyntheticTeacher
from clips4.synthetic.world import ClassSpec, SyntheticWorld

__all__ = ["PATTERNS", "WORLDS", "class_family", "spurious_specs", "world_from_preset", "make_teacher"]


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
    """Backend factory for configs: ``clip.backend: clips4.synthetic:make_teacher`` with
    ``backend_params`` naming the world (``world`` a name of ``WORLDS``, or ``n_classes`` for the default one;
    ``image_size``, ``world_seed``) and the teacher's params (over the named world's own)."""
    if world is None:
        w, preset = SyntheticWorld(n_classes=n_classes, image_size=tuple(image_size), seed=world_seed), {}
    else:
        w, preset = world_from_preset(world, image_size, world_seed)
    return w.teacher(**{**preset, **teacher_params})
