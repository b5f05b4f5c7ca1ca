"""CLIP is prompted with natural-language class names (MaskCLIP's lists); datasets and reports keep their own."""
from __future__ import annotations

import numpy as np
import pytest

from clips4 import data as bundled
from clips4.pipeline.backends import class_text_embeddings, text_embeddings


def _diff(key: str) -> dict[str, str]:
    names = bundled.class_names(key)
    prompts = bundled.prompt_names(names)
    assert len(prompts) == len(names)
    return {n: p for n, p in zip(names, prompts) if n != p}


# The differences from MaskCLIP's tools/maskclip_utils/prompt_engineering.py (voc_classes,
# pascal_context_classes, coco_stuff_classes), position for position against our dataset lists.
VOC = {"aeroplane": "airplane", "diningtable": "dining table", "pottedplant": "potted plant",
       "tvmonitor": "tv monitor"}
CONTEXT59 = {"aeroplane": "airplane", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
COCOSTUFF171 = {
    "building-other": "building", "ceiling-other": "ceiling", "ceiling-tile": "tile ceiling", "desk-stuff": "desk",
    "door-stuff": "door", "floor-marble": "marble floor", "floor-other": "floor", "floor-stone": "stone floor",
    "floor-tile": "tile floor", "floor-wood": "wood floor", "food-other": "food", "furniture-other": "furniture",
    "ground-other": "ground", "mirror-stuff": "mirror", "plant-other": "plant", "sky-other": "sky",
    "solid-other": "solid", "structural-other": "structural", "textile-other": "textile", "wall-brick": "brick wall",
    "wall-concrete": "concrete wall", "wall-other": "wall", "wall-panel": "panel wall", "wall-stone": "stone wall",
    "wall-tile": "tile wall", "wall-wood": "wood wall", "water-other": "water", "window-blind": "blind window",
    "window-other": "window",
}


@pytest.mark.parametrize("key, expected, n", [("voc21", VOC, 21), ("context59", CONTEXT59, 59),
                                               ("cocostuff171", COCOSTUFF171, 171)])
def test_prompt_lists_match_maskclip(key, expected, n):
    assert len(bundled.class_names(key)) == n
    d = _diff(key)
    assert d == expected
    assert len(d) == {"voc21": 4, "context59": 3, "cocostuff171": 29}[key]
    # every other name is prompted as it is, and the dataset list itself is untouched
    assert bundled.class_names("voc21")[0] == "background" and "diningtable" in bundled.class_names("voc21")


def test_pascal_context_detail_names_and_unknown_names_map():
    # the Pascal-Context dataset reads the Detail-API list; its names map through the same table
    ctx = bundled.class_names("context60_detail")
    assert bundled.prompt_names(ctx)[1] == "airplane" and "tv monitor" in bundled.prompt_names(ctx)
    assert bundled.prompt_names(["sky", "my-own class", "wall-brick"]) == ["sky", "my-own class", "brick wall"]


class _RecordingBackend:
    """Encodes a text as a hashed random unit vector; remembers every text it was asked for."""

    embed_dim = 16

    def __init__(self):
        self.seen: list[str] = []

    def encode_text(self, texts):
        self.seen += list(texts)
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=self.embed_dim) for t in texts])


def test_class_text_embeddings_prompt_with_natural_names():
    b = _RecordingBackend()
    emb = class_text_embeddings(b, ["diningtable", "cat"])
    assert emb.shape == (2, 16)
    assert "a photo of a dining table." in b.seen and not any("diningtable" in t for t in b.seen)
    assert len(b.seen) == 2 * len(bundled.prompt_templates())
    ref = text_embeddings(_RecordingBackend(), ["dining table", "cat"], bundled.prompt_templates())
    np.testing.assert_allclose(emb, ref, atol=1e-6)
