"""DAVIS 2017 instance mask propagation (paper section 4.5) and the DAVIS 2017 J / F metrics.

Propagation protocol -- the label propagation of the contrastive random walk (Jabri et al. 2020,
``ajabri/videowalk`` ``code/test.py`` + ``code/utils/test_utils.py`` + ``code/data/vos.py``), reproduced:

* every frame is embedded to an ``(h, w, D)`` L2-normalised feature grid by ``embed(frame)``;
* the first frame's annotation is turned into per-object one-hot maps (ids ``0..K``, ``K`` = max id of the first
  annotation, 255 -> 0 as the toolkit does) and resized to the feature grid with ``cv2.resize`` bilinear
  (``INTER_LINEAR``, what ``vos.py`` ends up calling) -> soft labels that sum to 1;
* the video is conceptually padded at the front with ``n_context`` copies of frame 0 (``vos.py make_paths``);
  target frame ``t >= 1`` uses as context (a) the first frame ("long memory", **no** spatial restriction) and
  (b) the ``n_context`` preceding padded positions, i.e. real frames ``max(0, t - n_context) .. t - 1`` with frame
  0 repeated ``n_context - t + 1`` times while ``t <= n_context`` -- each occurrence is a separate set of
  candidate nodes, exactly like the reference's concatenated key tensor;
* short-context nodes are restricted to those whose grid distance to the query cell is ``< radius``
  (``MaskedAttention``: Euclidean distance on the feature grid, strict inequality);
* affinity ``A = <q, k> / temperature`` over all allowed context nodes together; the ``topk`` largest are kept
  and soft-maxed; the target's label map is the weighted sum of those nodes' label vectors;
* predicted frames keep their *soft* label maps (no argmax, no re-normalisation: ``norm_mask`` is off by default)
  and serve as context for later frames; for output a label map is resized to the frame size with
  ``cv2.resize`` (bilinear) and arg-maxed (``dump_predictions``). Frame 0 is written as the given annotation.

The top-k over the union of context nodes is computed exactly but without the dense masked affinity: the
radius restriction is evaluated as a set of grid offsets (``dy^2 + dx^2 < radius^2``), per-source top-k are
taken first and merged (the top-k of a union is the top-k of the per-part top-ks), duplicated context frames
contribute duplicated candidates.

Metrics -- the DAVIS 2017 toolkit (``davisvideochallenge/davis2017-evaluation``), reproduced:

* ``davis2017/metrics.py``: ``db_eval_iou`` (J; union 0 -> 1), ``f_measure`` / ``db_eval_boundary`` (F) with
  ``_seg2bmap`` boundaries, ``bound_pix = bound_th if bound_th >= 1 else ceil(bound_th * ||(H, W)||)``, dilation
  with ``skimage.morphology.disk(bound_pix)`` (``cv2.dilate``), empty conventions: both boundaries empty ->
  P = R = 1; prediction empty -> P = 1, R = 0; GT empty -> P = 0, R = 1; F = 0 when P + R = 0;
* ``davis2017/davis.py get_all_masks``: GT 255 (void) is set to 0, number of objects = max id of the *first*
  annotation, per-object binary masks ``mask == id``;
* ``davis2017/evaluation.py``: for the semi-supervised task the first and last frames are dropped
  (``all_gt_masks[:, 1:-1]``), void masks are *not* used (``_evaluate_semisupervised(..., None, ...)``), a result
  with fewer objects is zero-padded, one with more objects is an error;
* ``davis2017/utils.py db_statistics``: per object mean ``M = nanmean``, recall ``R = nanmean(x > 0.5)`` and decay
  ``D`` (first-quarter minus last-quarter mean);
* ``evaluation_method.py``: ``J&F-Mean = (mean_objects(J-M) + mean_objects(F-M)) / 2``; J-Mean / F-Mean are means
  over *all objects of all sequences* (each object weighs the same). Per-sequence numbers here are the means over
  that sequence's objects (the toolkit's per-sequence CSV lists objects as ``<seq>_<i>``; both are reported).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional, Sequence

import cv2
import numpy as np
import torch
import typer
from PIL import Image

from clips4.evaluate.palette import load_indexed_png, save_indexed_png, voc_palette
from clips4.pipeline.safepath import check_name, output_path

__all__ = [
    "DavisSequence",
    "list_sequences",
    "load_sequence",
    "db_eval_iou",
    "seg2bmap",
    "f_measure",
    "db_eval_boundary",
    "db_statistics",
    "evaluate_sequence",
    "evaluate_results_dir",
    "summarize",
    "color_embedding",
    "make_color_embedder",
    "register_embedder",
    "get_embedder",
    "propagate_sequence",
    "labels_to_onehot",
    "run_davis",
    "davis_command",
    "DAVIS_PALETTE",
]

DAVIS_PALETTE = voc_palette(256)
EmbedFn = Callable[[np.ndarray], np.ndarray]


# =============================================================================== dataset layout
@dataclass
class DavisSequence:
    """One DAVIS sequence: sorted frame paths and annotation paths (annotations may be fewer, e.g. test)."""

    name: str
    frames: list[Path]
    annotations: list[Path] = field(default_factory=list)

    @property
    def frame_ids(self) -> list[str]:
        return [p.stem for p in self.frames]

    def __len__(self) -> int:
        return len(self.frames)

    def read_frame(self, i: int) -> np.ndarray:
        with Image.open(self.frames[i]) as im:
            return np.array(im.convert("RGB"))

    def read_annotation(self, i: int) -> np.ndarray:
        return load_indexed_png(self.annotations[i])

    def annotation_for(self, i: int) -> Path | None:
        """The annotation of frame ``i`` matched by name (``<frame>.png``), or None when it has none."""
        by_name = {p.stem: p for p in self.annotations}
        return by_name.get(self.frames[i].stem)


def list_sequences(root: str | Path, split: str = "val", year: str = "2017") -> list[str]:
    """Sequence names from ``<root>/ImageSets/<year>/<split>.txt``."""
    path = Path(root) / "ImageSets" / year / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"DAVIS sequence list not found: {path}")
    # names are joined into input and output paths: refuse '/abs/seq', '../x' (they would escape the folders)
    return [check_name(ln.strip(), what="sequence name", source=str(path), line=n)
            for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]


def load_sequence(root: str | Path, name: str, resolution: str = "480p") -> DavisSequence:
    """Frames ``JPEGImages/<res>/<seq>/*.jpg`` and annotations ``Annotations/<res>/<seq>/*.png`` (sorted)."""
    root = Path(root)
    frames = sorted((root / "JPEGImages" / resolution / name).glob("*.jpg"))
    if not frames:
        raise FileNotFoundError(f"no frames for DAVIS sequence {name!r} under {root / 'JPEGImages' / resolution}")
    annots = sorted((root / "Annotations" / resolution / name).glob("*.png"))
    return DavisSequence(name=name, frames=frames, annotations=annots)


# =============================================================================== metrics (toolkit)
def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray, void_pixels: np.ndarray | None = None):
    """Region similarity J (Jaccard) for binary masks ``(H, W)`` or ``(T, H, W)``; union 0 -> 1."""
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ")
    keep = np.ones_like(annotation) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    inters = np.sum(segmentation & annotation & keep, axis=(-2, -1))
    union = np.sum((segmentation | annotation) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inters / union
    if np.ndim(j) == 0:
        return 1.0 if union == 0 else float(j)
    j = np.asarray(j, dtype=np.float64)
    j[union == 0] = 1.0
    return j


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary map of a binary mask, offset half a pixel towards the origin (D. Martin's
    ``seg2bmap`` as used by the toolkit): a pixel is a boundary pixel when it differs from its east, south or
    south-east neighbour; the last row only compares east, the last column only south, the corner is 0."""
    seg = np.asarray(seg).astype(bool)
    if seg.ndim != 2:
        raise ValueError("seg2bmap expects a 2-D mask")
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    try:  # the toolkit's structuring element
        from skimage.morphology import disk

        return disk(radius).astype(np.uint8)
    except ImportError:  # pragma: no cover - same definition: x^2 + y^2 <= r^2
        r = int(radius)
        y, x = np.mgrid[-r : r + 1, -r : r + 1]
        return ((x * x + y * y) <= r * r).astype(np.uint8)


def f_measure(
    foreground_mask: np.ndarray,
    gt_mask: np.ndarray,
    void_pixels: np.ndarray | None = None,
    bound_th: float = 0.008,
) -> float:
    """Boundary F-measure of one frame (the toolkit's ``f_measure``)."""
    fg = np.asarray(foreground_mask).astype(bool)
    gt = np.asarray(gt_mask).astype(bool)
    keep = np.ones_like(fg) if void_pixels is None else ~np.asarray(void_pixels).astype(bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
    fg_boundary = seg2bmap(fg & keep)
    gt_boundary = seg2bmap(gt & keep)
    se = _disk(int(bound_pix))
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), se)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), se)
    gt_match = gt_boundary & (fg_dil > 0)
    fg_match = fg_boundary & (gt_dil > 0)
    n_fg = int(fg_boundary.sum())
    n_gt = int(gt_boundary.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = fg_match.sum() / float(n_fg)
        recall = gt_match.sum() / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, void_pixels=None, bound_th: float = 0.008):
    """F for ``(H, W)`` (float) or ``(T, H, W)`` (array of per-frame values); note the argument order
    (annotation first) is the toolkit's."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ")
    if annotation.ndim == 3:
        return np.array(
            [
                f_measure(segmentation[i], annotation[i], None if void_pixels is None else void_pixels[i], bound_th)
                for i in range(annotation.shape[0])
            ]
        )
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, void_pixels, bound_th)
    raise ValueError(f"db_eval_boundary does not support {annotation.ndim}-D input")


def db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values as the toolkit's ``db_statistics`` (NaN-tolerant; the bin
    indices are int64 where the toolkit casts to uint8, identical below 256 frames)."""
    v = np.asarray(per_frame_values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        m = float(np.nanmean(v)) if v.size else float("nan")
        r = float(np.nanmean(v > 0.5)) if v.size else float("nan")
        n_bins = 4
        ids = (np.round(np.linspace(1, len(v), n_bins + 1) + 1e-10) - 1).astype(np.int64)
        bins = [v[ids[i] : ids[i + 1] + 1] for i in range(n_bins)]
        d = float(np.nanmean(bins[0]) - np.nanmean(bins[3])) if v.size else float("nan")
    return m, r, d


def _split_objects(masks: np.ndarray, n_objects: int) -> np.ndarray:
    """``(T, H, W)`` ids -> ``(n_objects, T, H, W)`` bool with ``[k] = masks == k + 1``."""
    ids = np.arange(1, n_objects + 1)[:, None, None, None]
    return masks[None] == ids


def evaluate_sequence(
    gt_masks: np.ndarray,
    pred_masks: np.ndarray,
    *,
    semi_supervised: bool = True,
    bound_th: float = 0.008,
    n_objects: int | None = None,
) -> dict:
    """J and F of one sequence. ``gt_masks`` / ``pred_masks``: ``(T, H, W)`` integer ids (0 = background).

    Semi-supervised protocol of the toolkit: 255 in GT -> 0, objects = ``1..max(gt[0])``, frames ``1..T-2``
    scored (first and last dropped), missing predicted objects are empty masks, extra predicted ids raise.
    Returns per-object per-frame lists and statistics, plus the sequence means over objects.
    ``n_objects`` (the first annotation's object count) is given when ``gt_masks`` does not start with it.
    """
    gt = np.asarray(gt_masks).astype(np.int64).copy()
    pred = np.asarray(pred_masks).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"GT {gt.shape} and prediction {pred.shape} shapes differ")
    gt[gt == 255] = 0
    n_obj = n_objects if n_objects is not None else (int(gt[0].max()) if gt.size else 0)
    if semi_supervised:
        gt, pred = gt[1:-1], pred[1:-1]
    n_pred = int(pred.max()) if pred.size else 0
    if n_pred > n_obj:
        raise ValueError(f"prediction has object id {n_pred} but the first annotation has only {n_obj} objects")
    gt_obj = _split_objects(gt, n_obj)
    pred_obj = _split_objects(pred, n_obj)
    objects = []
    for k in range(n_obj):
        j = np.atleast_1d(db_eval_iou(gt_obj[k], pred_obj[k])) if gt.shape[0] else np.zeros(0)
        f = np.atleast_1d(db_eval_boundary(gt_obj[k], pred_obj[k], bound_th=bound_th)) if gt.shape[0] else np.zeros(0)
        jm, jr, jd = db_statistics(j)
        fm, fr, fd = db_statistics(f)
        objects.append(
            {
                "object": k + 1,
                "J": {"M": jm, "R": jr, "D": jd},
                "F": {"M": fm, "R": fr, "D": fd},
                "J_per_frame": [float(x) for x in j],
                "F_per_frame": [float(x) for x in f],
            }
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        jmean = float(np.nanmean([o["J"]["M"] for o in objects])) if objects else float("nan")
        fmean = float(np.nanmean([o["F"]["M"] for o in objects])) if objects else float("nan")
    return {
        "n_objects": n_obj,
        "n_frames_scored": int(gt.shape[0]),
        "objects": objects,
        "J": jmean,
        "F": fmean,
        "J&F": (jmean + fmean) / 2,
    }


def summarize(per_sequence: dict[str, dict]) -> dict:
    """Toolkit global numbers from :func:`evaluate_sequence` outputs: means over all objects."""
    jm, fm, jr, fr, jd, fd = [], [], [], [], [], []
    per_object = {}
    for seq, res in per_sequence.items():
        for o in res["objects"]:
            jm.append(o["J"]["M"]), fm.append(o["F"]["M"])
            jr.append(o["J"]["R"]), fr.append(o["F"]["R"])
            jd.append(o["J"]["D"]), fd.append(o["F"]["D"])
            per_object[f"{seq}_{o['object']}"] = {"J": o["J"]["M"], "F": o["F"]["M"]}
    mean = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731 - toolkit uses np.mean
    j, f = mean(jm), mean(fm)
    return {
        "J&F-Mean": (j + f) / 2,
        "J-Mean": j,
        "J-Recall": mean(jr),
        "J-Decay": mean(jd),
        "F-Mean": f,
        "F-Recall": mean(fr),
        "F-Decay": mean(fd),
        "n_objects": len(jm),
        "per_object": per_object,
    }


def score_by_name(seq: DavisSequence, n: int, pred: Callable[[int], np.ndarray], *, bound_th: float = 0.008) -> dict:
    """Semi-supervised J/F of the first ``n`` frames of ``seq``, ground truth matched to frames by file name.

    ``pred(i)`` is frame ``i``'s predicted ids. Object count from frame 0's annotation (missing: an error); the
    first and last frame are not scored (toolkit protocol); a frame without an annotation is not scored and
    listed in ``missing_annotations``."""
    first = seq.annotation_for(0)
    if first is None:
        raise FileNotFoundError(f"sequence {seq.name}: no annotation for its first frame {seq.frames[0].name} "
                                f"(expected {seq.frames[0].stem}.png in Annotations); its masks are the input")
    ann0 = load_indexed_png(first)
    n_obj = int(np.where(ann0 == 255, 0, ann0).max())
    missing = [seq.frames[i].stem for i in range(n) if seq.annotation_for(i) is None]
    scored = [i for i in range(1, n - 1) if seq.annotation_for(i) is not None]
    if scored:
        gt = np.stack([load_indexed_png(seq.annotation_for(i)) for i in scored])
        pr = np.stack([pred(i) for i in scored])
    else:
        gt = pr = np.zeros((0,) + ann0.shape, np.int64)
    res = evaluate_sequence(gt, pr, semi_supervised=False, bound_th=bound_th, n_objects=n_obj)
    res["missing_annotations"] = missing
    return res


def evaluate_results_dir(
    root: str | Path,
    results_dir: str | Path,
    sequences: Sequence[str] | None = None,
    *,
    split: str = "val",
    resolution: str = "480p",
    max_frames: int | None = None,
) -> dict:
    """Score a DAVIS-layout results folder (``<results>/<seq>/<frame>.png``) against ``<root>/Annotations``."""
    root, results_dir = Path(root), Path(results_dir)
    names = ([check_name(s, what="sequence name", source="sequences") for s in sequences] if sequences
             else list_sequences(root, split))
    per_seq = {}
    for name in names:
        seq = load_sequence(root, name, resolution)
        n = len(seq) if max_frames is None else min(max_frames, len(seq))
        per_seq[name] = score_by_name(
            seq, n, lambda i: load_indexed_png(results_dir / name / f"{seq.frames[i].stem}.png"))
    return {"sequences": per_seq, "global": summarize(per_seq)}


# =============================================================================== embeddings
def color_embedding(frame: np.ndarray, stride: int = 8, color_scale: float = 0.03, xy_scale: float = 0.03) -> np.ndarray:
    """Colour + position baseline embedding ``(ceil(H/stride), ceil(W/stride), 6)`` float32, L2-normalised.

    Each grid cell: mean CIE-Lab colour (``cv2`` float conversion: L in 0..100, a/b ~ -128..127), centred
    (L - 50), times ``color_scale``; cell coordinates centred on the image, times ``xy_scale`` (in cells);
    plus a constant 1 so that, after normalisation, the dot product decreases with colour/position distance.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got {frame.shape}")
    h, w = math.ceil(frame.shape[0] / stride), math.ceil(frame.shape[1] / stride)
    lab = cv2.cvtColor(frame.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab = cv2.resize(lab, (w, h), interpolation=cv2.INTER_AREA)
    lab[..., 0] -= 50.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy -= (h - 1) / 2
    xx -= (w - 1) / 2
    feat = np.concatenate(
        [lab * color_scale, np.stack([xx, yy], -1) * xy_scale, np.ones((h, w, 1), np.float32)], axis=-1
    )
    feat /= np.linalg.norm(feat, axis=-1, keepdims=True)
    return feat.astype(np.float32)


def make_color_embedder(stride: int = 8, color_scale: float = 0.03, xy_scale: float = 0.03) -> EmbedFn:
    return lambda frame: color_embedding(frame, stride, color_scale, xy_scale)


_EMBEDDERS: dict[str, Callable[..., EmbedFn]] = {"color": lambda **kw: make_color_embedder()}


def register_embedder(name: str, factory: Callable[..., EmbedFn]) -> None:
    """Register an embedding source for ``--embedding NAME``: ``factory(checkpoint=Path|None, device=str)``
    returns ``embed(frame (H, W, 3) uint8) -> (h, w, D) float32`` (L2-normalised along D)."""
    _EMBEDDERS[name] = factory


def get_embedder(name: str, checkpoint: Path | None = None, device: str | None = None) -> EmbedFn:
    if name not in _EMBEDDERS:
        if name == "checkpoint":
            raise ValueError(
                "embedding 'checkpoint' is not wired yet: call "
                "clips4.evaluate.davis.register_embedder('checkpoint', factory) with a model loader"
            )
        raise ValueError(f"unknown embedding {name!r}; known: {sorted(_EMBEDDERS)}")
    return _EMBEDDERS[name](checkpoint=checkpoint, device=device)


# =============================================================================== propagation
def labels_to_onehot(labels: np.ndarray, n_labels: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` ids -> ``(h, w, n_labels)`` float32 soft labels at the feature grid (cv2 bilinear resize of
    the full-resolution one-hot, as ``vos.py``)."""
    onehot = (labels[..., None] == np.arange(n_labels)[None, None]).astype(np.float32)
    h, w = grid_hw
    out = cv2.resize(onehot, (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w, n_labels)


def upsample_labels(soft: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``(h, w, C)`` soft labels -> ``(H, W)`` ids: cv2 bilinear resize then argmax (``dump_predictions``)."""
    H, W = out_hw
    c = soft.shape[-1]
    if c <= 512:
        up = cv2.resize(np.ascontiguousarray(soft, dtype=np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
        up = up.reshape(H, W, c)
    else:  # cv2 channel limit
        up = np.concatenate(
            [cv2.resize(np.ascontiguousarray(soft[..., i : i + 512]), (W, H)).reshape(H, W, -1) for i in range(0, c, 512)],
            -1,
        )
    return np.argmax(up, axis=-1).astype(np.int64)


def _radius_offsets(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = (dy * dy + dx * dx) < radius * radius
    return np.stack([dy[keep], dx[keep]], 1)


class _Propagator:
    """Holds the first frame and the sliding short-term context; ``step(feat)`` returns soft labels."""

    def __init__(self, feat0: torch.Tensor, labels0: torch.Tensor, n_context: int, radius: float, topk: int,
                 temperature: float, query_chunk: int = 4096, dense: bool | None = None):
        # feat: (D, h, w) normalised; labels: (C, h, w)
        self.D, self.h, self.w = feat0.shape
        self.n_context, self.topk, self.temperature = n_context, topk, temperature
        self.query_chunk = query_chunk
        self.feat0, self.labels0 = feat0, labels0
        # dense similarities pay off on GPU or for wide embeddings; shifted products for the tiny colour features
        self.dense = (feat0.device.type == "cuda" or self.D > 32) if dense is None else dense
        dev = feat0.device
        h, w = self.h, self.w
        self.offsets = _radius_offsets(radius)
        self.R = int(np.abs(self.offsets).max()) if len(self.offsets) else 0
        # For each allowed offset: flat index of the source cell and -inf where it falls outside the grid.
        off = torch.as_tensor(self.offsets, device=dev)
        yy = torch.arange(h, device=dev)[None, :, None] + off[:, 0, None, None]
        xx = torch.arange(w, device=dev)[None, None, :] + off[:, 1, None, None]
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        self.src_index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(len(off), h * w)  # (O, hw)
        self.bias = torch.zeros(len(off), h * w, device=dev, dtype=feat0.dtype)
        self.bias[~inside.reshape(len(off), -1)] = -float("inf")
        # short context: padded positions (frame index, feat, labels); starts as n_context copies of frame 0
        self.context: deque = deque([(0, feat0, labels0)] * n_context, maxlen=n_context)
        self.t = 0

    def _long(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """top-k over all nodes of frame 0 (unrestricted): values (k, hw), labels (k, hw, C)."""
        D, hw = self.D, self.h * self.w
        k0 = self.feat0.reshape(D, hw)
        qf = q.reshape(D, hw)
        lab0 = self.labels0.reshape(-1, hw).T  # (hw, C)
        vals, labs = [], []
        k = min(self.topk, hw)
        for s in range(0, hw, self.query_chunk):
            a = qf[:, s : s + self.query_chunk].T @ k0  # (q, hw) cosine similarities
            v, i = torch.topk(a, k, dim=1)  # top-k of a is top-k of a / temperature
            vals.append(v.T / self.temperature)
            labs.append(lab0[i].permute(1, 0, 2))  # (k, q, C)
        return torch.cat(vals, 1), torch.cat(labs, 1)

    def _local(self, q: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor):
        """top-k over the radius-restricted nodes of each source frame.

        feats (S, D, h, w), labels (S, C, h, w) -> values (S, k, hw), labels (S, k, hw, C)."""
        S, D, h, w = feats.shape
        C, hw, n_off = labels.shape[1], h * w, len(self.offsets)
        if self.dense:
            # dense (hw x hw) similarities per source frame, then pick the allowed offsets (fast for large D)
            qf = q.reshape(D, hw)
            aff = torch.empty(S, n_off, hw, device=feats.device, dtype=feats.dtype)
            for s in range(S):
                kf = feats[s].reshape(D, hw)
                for c0 in range(0, hw, self.query_chunk):
                    a = qf[:, c0 : c0 + self.query_chunk].T @ kf  # (q, hw)
                    aff[s, :, c0 : c0 + self.query_chunk] = torch.gather(
                        a, 1, self.src_index[:, c0 : c0 + self.query_chunk].T
                    ).T
        else:
            # per-offset shifted dot products (fast for small D, e.g. the colour baseline)
            R = self.R
            fp = torch.nn.functional.pad(feats, (R, R, R, R))
            aff = torch.zeros(S, n_off, h, w, device=feats.device, dtype=feats.dtype)
            for o, (dy, dx) in enumerate(self.offsets):
                ys, xs = R + dy, R + dx
                out = aff[:, o]
                for d in range(D):
                    out.addcmul_(q[d][None], fp[:, d, ys : ys + h, xs : xs + w])
            aff = aff.reshape(S, n_off, hw)
        aff += self.bias[None]
        k = min(self.topk, n_off)
        v, oi = torch.topk(aff, k, dim=1)  # (S, k, hw)
        src = torch.gather(self.src_index[None].expand(S, -1, -1), 1, oi)  # (S, k, hw) flat source cells
        lab = labels.reshape(S, C, hw).transpose(1, 2)  # (S, hw, C)
        lab = torch.gather(lab, 1, src.reshape(S, -1, 1).expand(-1, -1, C)).reshape(S, k, hw, C)
        return v / self.temperature, lab

    def step(self, q: torch.Tensor) -> torch.Tensor:
        """Propagate to the next frame with features ``q`` (D, h, w); returns soft labels (C, h, w)."""
        lv, ll = self._long(q)
        # distinct source frames with multiplicities (frame 0 repeats while t <= n_context)
        order: dict[int, list] = {}
        for idx, feat, lab in self.context:
            if idx in order:
                order[idx][2] += 1
            else:
                order[idx] = [feat, lab, 1]
        feats = torch.stack([v[0] for v in order.values()])
        labels = torch.stack([v[1] for v in order.values()])
        mult = torch.as_tensor([v[2] for v in order.values()], device=q.device)
        sv, sl = self._local(q, feats, labels)  # (S, k, hw), (S, k, hw, C)
        S, ks, hw = sv.shape
        # duplicated context frames contribute duplicated candidates: repeat the values, map rows to labels
        rows = torch.repeat_interleave(torch.arange(S * ks, device=q.device).reshape(S, ks), mult, dim=0).flatten()
        allv = torch.cat([lv, sv.reshape(S * ks, hw)[rows]], 0)  # (k + n_context * k, hw)
        label_rows = torch.cat([torch.arange(lv.shape[0], device=q.device), rows + lv.shape[0]])
        alll = torch.cat([ll, sl.reshape(S * ks, hw, -1)], 0)  # (k + S * k, hw, C)
        k = min(self.topk, allv.shape[0])
        v, i = torch.topk(allv, k, dim=0)
        wts = torch.softmax(v, dim=0)  # (k, hw)
        gathered = torch.gather(alll, 0, label_rows[i][..., None].expand(-1, -1, alll.shape[-1]))  # (k, hw, C)
        pred = (gathered * wts[..., None]).sum(0)  # (hw, C)
        pred = pred.T.reshape(-1, self.h, self.w).contiguous()
        self.t += 1
        self.context.append((self.t, q, pred))
        return pred


def propagate_sequence(
    frames: Iterable[np.ndarray],
    first_annotation: np.ndarray,
    embed: EmbedFn,
    *,
    n_context: int = 20,
    radius: float = 12.0,
    topk: int = 10,
    temperature: float = 0.07,
    device: str | None = None,
) -> Iterable[np.ndarray]:
    """Yield ``(H, W) int64`` object-id masks for every frame (frame 0 = ``first_annotation`` itself).

    ``frames`` is consumed lazily; memory holds only frame 0 and the last ``n_context`` feature maps.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ann = np.asarray(first_annotation).astype(np.int64).copy()
    ann[ann == 255] = 0
    n_labels = int(ann.max()) + 1
    prop = None
    for t, frame in enumerate(frames):
        emb = np.asarray(embed(frame), dtype=np.float32)
        if emb.ndim != 3:
            raise ValueError(f"embedding must be (h, w, D), got {emb.shape}")
        feat = torch.from_numpy(np.ascontiguousarray(emb.transpose(2, 0, 1))).to(dev)
        feat = torch.nn.functional.normalize(feat, dim=0)
        H, W = frame.shape[:2]
        if t == 0:
            lab0 = labels_to_onehot(ann, n_labels, emb.shape[:2])
            prop = _Propagator(feat, torch.from_numpy(lab0.transpose(2, 0, 1).copy()).to(dev), n_context,
                               radius, topk, temperature)
            yield ann
            continue
        if feat.shape[1:] != (prop.h, prop.w):
            raise ValueError(f"frame {t}: feature grid {tuple(feat.shape[1:])} != first frame's {(prop.h, prop.w)}")
        soft = prop.step(feat)
        yield upsample_labels(soft.permute(1, 2, 0).cpu().numpy(), (H, W))


# =============================================================================== runner + command
def run_davis(
    root: str | Path,
    out: str | Path,
    *,
    embed: EmbedFn | None = None,
    embedding: str = "color",
    checkpoint: Path | None = None,
    sequences: Sequence[str] | None = None,
    split: str = "val",
    n_context: int = 20,
    radius: float = 12.0,
    topk: int = 10,
    temperature: float = 0.07,
    limit_frames: int | None = None,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Propagate the first-frame masks of each sequence, write ``<out>/<seq>/<frame>.png`` (DAVIS palette),
    score them with the toolkit protocol, write ``<out>/davis_results.json`` and return the results dict."""
    if limit_frames is not None and limit_frames < 3:
        raise ValueError("limit_frames must be >= 3: the first and last frames are not scored (DAVIS protocol)")
    root, out = Path(root), Path(out)
    embed_arg = embed
    embed = embed or get_embedder(embedding, checkpoint, device)
    names = ([check_name(s, what="sequence name", source="--sequences") for s in sequences] if sequences
             else list_sequences(root, split))
    per_seq, timing = {}, {}
    # what a finished sequence's saved result depends on: a rerun with the same settings skips it
    run_key = {"embedding": embedding if embed_arg is None else "custom", "checkpoint": str(checkpoint) if checkpoint else None,
               "checkpoint_file": _file_stamp(checkpoint), "n_context": n_context, "radius": radius, "topk": topk,
               "temperature": temperature, "limit_frames": limit_frames}
    for name in names:
        t0 = time.time()
        seq = load_sequence(root, name)
        n = len(seq) if limit_frames is None else min(limit_frames, len(seq))
        done_file = output_path(out, "sequences", f"{name}.json", what="per-sequence result")
        prev = _load_done(done_file, run_key)
        if prev is not None:
            per_seq[name], timing[name] = prev["result"], prev["seconds"]
            if progress:
                progress(f"{name}: already scored (J&F={per_seq[name]['J&F']:.4f}, {done_file}); skipped")
            continue
        first = seq.annotation_for(0)
        if first is None:
            raise FileNotFoundError(f"sequence {name}: no annotation for its first frame {seq.frames[0].name} "
                                    "(the first frame's mask is the input)")
        frames = (seq.read_frame(i) for i in range(n))
        preds = []
        for i, mask in enumerate(
            propagate_sequence(frames, load_indexed_png(first), embed, n_context=n_context, radius=radius,
                               topk=topk, temperature=temperature, device=device)
        ):
            save_indexed_png(output_path(out, name, f"{seq.frames[i].stem}.png", what="DAVIS mask"), mask, DAVIS_PALETTE)
            preds.append(mask)
        per_seq[name] = score_by_name(seq, n, lambda i: preds[i])
        timing[name] = time.time() - t0
        _save_done(done_file, run_key, per_seq[name], timing[name])
        if progress:
            r = per_seq[name]
            miss = r["missing_annotations"]
            progress(f"{name}: J={r['J']:.4f} F={r['F']:.4f} J&F={r['J&F']:.4f} ({n} frames, {timing[name]:.1f}s)"
                     + (f"; {len(miss)} frame(s) without annotation not scored: {', '.join(miss[:10])}"
                        + (" …" if len(miss) > 10 else "") if miss else ""))
    result = {
        "task": "davis2017-semi-supervised-propagation",
        "config": {
            "root": str(root), "embedding": embedding if embed_arg is None else "custom",
            "checkpoint": str(checkpoint) if checkpoint else None, "split": split, "sequences": names,
            "n_context": n_context, "radius": radius, "topk": topk, "temperature": temperature,
            "limit_frames": limit_frames,
        },
        "sequences": per_seq,
        "global": summarize(per_seq),
        "seconds": timing,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "davis_results.json").write_text(json.dumps(result, indent=2, allow_nan=True))
    return result


def _file_stamp(path: Path | None) -> str | None:
    if not path:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return f"{st.st_size}-{st.st_mtime_ns}"


def _load_done(path: Path, run_key: dict) -> dict | None:
    """A finished sequence's saved result when it was made with the same settings, else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if doc.get("run") == run_key and "result" in doc else None


def _save_done(path: Path, run_key: dict, result: dict, seconds: float) -> None:
    """Written as the sequence finishes (temp file + rename: a kill never leaves half a file)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"run": run_key, "result": result, "seconds": seconds}, allow_nan=True))
    os.replace(tmp, path)


def davis_command(
    root: Annotated[Optional[Path], typer.Option(help="DAVIS 2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017).")] = None,
    embedding: Annotated[str, typer.Option(help="Embedding source: 'color' (Lab + xy baseline) or 'checkpoint' (a trained model; needs --checkpoint).")] = "color",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Model checkpoint for --embedding checkpoint.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder: <out>/<sequence>/<frame>.png palette masks and davis_results.json.")] = Path("runs/davis"),
    context: Annotated[int, typer.Option(help="Number of preceding frames used as context (the first frame is always added).")] = 20,
    radius: Annotated[float, typer.Option(help="Spatial radius on the feature grid for preceding-frame neighbours (distance < radius).")] = 12.0,
    topk: Annotated[int, typer.Option(help="Number of most similar context nodes whose labels are averaged.")] = 10,
    temperature: Annotated[float, typer.Option(help="Softmax temperature applied to the cosine affinities.")] = 0.07,
    sequences: Annotated[Optional[list[str]], typer.Option(help="Sequences to run (repeat or comma-separate); default: ImageSets/2017/val.txt.")] = None,
    limit_frames: Annotated[Optional[int], typer.Option(help="Only propagate/score the first N frames of each sequence (quick checks; N >= 3).")] = None,
    device: Annotated[Optional[str], typer.Option(help="Torch device (default: cuda if available, else cpu).")] = None,
) -> None:
    """Propagate DAVIS 2017 first-frame masks with pixel embeddings and report J, F and J&F."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if root is None:
        raise SystemExit("--root is required (a DAVIS 2017 folder with JPEGImages/, Annotations/, ImageSets/)")
    seqs = [s for item in (sequences or []) for s in item.split(",") if s] or None
    res = run_davis(root, out, embedding=embedding, checkpoint=checkpoint, sequences=seqs, n_context=context,
                    radius=radius, topk=topk, temperature=temperature, limit_frames=limit_frames, device=device,
                    progress=lambda m: console.print(m))
    table = Table(title=f"DAVIS 2017 propagation ({embedding})")
    for col in ("Sequence", "objects", "J", "F", "J&F"):
        table.add_column(col, justify="right" if col != "Sequence" else "left")
    for name, r in res["sequences"].items():
        table.add_row(name, str(r["n_objects"]), f"{r['J']:.3f}", f"{r['F']:.3f}", f"{r['J&F']:.3f}")
    g = res["global"]
    table.add_row("[b]mean (over objects)[/b]", str(g["n_objects"]), f"{g['J-Mean']:.3f}", f"{g['F-Mean']:.3f}",
                  f"{g['J&F-Mean']:.3f}")
    console.print(table)
    console.print(f"masks + JSON written to {out} (davis_results.json)")
