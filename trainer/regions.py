"""Per-region recolouring of training views: what the teacher ignores about colour, imposed segment by segment.

The global photometric views (``train.augment.photometric``) transform a whole view at once, so they keep how the
colours and luminances of its regions compare: "the darker stripes are this class" or "the bluer region is that
one" survives every such view. Where colour or luminance is tied to the class in the training images but the
teacher ignores it (it reads texture), a student can learn that cue instead of the one its teacher reads, and it
fails wherever the tie breaks. Recolouring the superpixels of the view
(:func:`clips4.pipeline.regions.recolour_regions`: the regions trade their mean colours and texture contrasts by a
random permutation, each keeping its grey-level pattern; the segments stage's labels carried through the crop)
leaves no colour or luminance, absolute or relative, that the student could read a label from: the view's target
is still the teacher on the untouched image.

``train.augment.regions``: ``auto`` imposes it when the teacher is measured to be invariant to it
(``clips4.pipeline.invariances`` family ``local_recolour``: the cells of a random partition recoloured alike), so a
teacher that reads colour keeps its student reading colour; ``imposed``: always; ``none``: never (the paper).
Every view is recoloured so; its other photometric transforms (whole-view) follow.
"""
from __future__ import annotations

import numpy as np
import torch

from clips4.pipeline.regions import recolour_regions

__all__ = ["apply_regions"]


def apply_regions(img: torch.Tensor, labels, g: torch.Generator) -> torch.Tensor:
    """``img (3,S,S) float [0,1]`` -> same, every region of ``labels (S,S)`` recoloured with its own draw (one
    seed drawn from ``g``)."""
    lab = np.asarray(labels)
    if lab.shape != tuple(img.shape[1:]):
        raise ValueError(f"labels {lab.shape} do not match the view {tuple(img.shape[1:])}")
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g).item()))
    out = recolour_regions(img.permute(1, 2, 0).numpy(), lab, rng)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()
