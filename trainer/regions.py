"""Photometric transforms drawn per region of a view: the teacher's photometric invariances imposed segment by segment.

The global photometric views (``train.augment.photometric``) transform a whole view at once, so they keep how the
colours and luminances of its regions compare: "the brighter stripes are this class" or "the bluer region is that
one" survives every such view. Where colour or luminance is tied to the class in the training images but the
teacher ignores it (it reads texture), a student can learn that cue instead of the one its teacher reads, and it
fails wherever the tie breaks. Drawing the transform independently for every superpixel of the view (the
segments stage's labels, carried through the crop) leaves no colour or luminance relation between regions that
the student could read a label from: the view's target is still the teacher on the untouched image.

``train.augment.regions``: ``auto`` (the default) imposes per-region transforms when the teacher is measured to be
invariant to them (``clips4.pipeline.invariances`` families ``local_*``: each region of a random partition of the
image transformed on its own; every photometric family the global views impose must pass there too) and uses only
the photometric families the teacher is invariant to (the same gating as the global views); ``imposed``: always, with the families kept by ``photometric``; ``none``: never (the paper).

Each region draws its own transform from the view's photometric config (colour jitter, grayscale, channel
permutation, inversion; blur is left to the global view: blurring a region alone only adds edges) with every
probability raised to at least ``REGION_MIN_P`` for the families in force, so that most regions change.
"""
from __future__ import annotations

import numpy as np
import torch

from clips4.pipeline.photometric import PhotometricConfig, apply_ops, sample_ops

__all__ = ["region_config", "apply_regions"]

#: the least probability per region of each photometric family in force (colour jitter, grayscale, channel
#: permutation, inversion): below it too many regions keep their colours and their relation survives
REGION_MIN_P = {"jitter_p": 1.0, "gray_p": 0.2, "channel_shuffle_p": 0.5, "invert_p": 0.5}


def region_config(cfg) -> PhotometricConfig | None:
    """The per-region photometric config of a (gated) view config: its families in force (a factor or a
    probability above 0), blur off, probabilities raised to :data:`REGION_MIN_P`; ``None`` when no family is in
    force (nothing to draw)."""
    fields = {k: getattr(cfg, k) for k in PhotometricConfig.model_fields}
    fields["blur_p"] = 0.0
    if any(v > 0 for v in fields["jitter"]):
        fields["jitter_p"] = max(fields["jitter_p"], REGION_MIN_P["jitter_p"])
    else:
        fields["jitter_p"] = 0.0
    for k in ("gray_p", "channel_shuffle_p", "invert_p"):
        if fields[k] > 0:
            fields[k] = max(fields[k], REGION_MIN_P[k])
    if fields["jitter_p"] == 0 and not any(fields[k] > 0 for k in ("gray_p", "channel_shuffle_p", "invert_p")):
        return None
    return PhotometricConfig(**fields)


def apply_regions(img: torch.Tensor, labels, pcfg: PhotometricConfig, g: torch.Generator) -> torch.Tensor:
    """``img (3,S,S) float [0,1]`` -> same, every region (each id of ``labels (S,S)``; negative ids are one
    region too) transformed by its own draw of ``pcfg`` from ``g`` (drawn in increasing id order)."""
    lab = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    if lab.shape != img.shape[1:]:
        raise ValueError(f"labels {tuple(lab.shape)} do not match the view {tuple(img.shape[1:])}")
    out = img.clone()
    for r in torch.unique(lab).tolist():
        m = lab == r
        ys, xs = torch.nonzero(m, as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        ops = sample_ops(pcfg, g)
        box = apply_ops(img[:, y0:y1, x0:x1], ops)
        mb = m[y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = torch.where(mb[None], box, out[:, y0:y1, x0:x1])
    return out

