"""Language-driven semantic segmentation (paper section 4.3): pixels take the class whose text embedding is
the most cosine-similar to the pixel embedding.

Choices (documented conventions):

* **logit upsampling** (the common convention, MaskCLIP / mmseg ``resize(seg_logit)``): cosine similarities are
  computed at the embedding resolution, the ``(K, h, w)`` score map is resized bilinearly
  (``align_corners=False``) to the image size, then arg-maxed. ``upsample="embeddings"`` instead resizes the
  embeddings and re-normalises them before the cosine (more memory, nearly identical results).
* **VOC background**: ``mode 21`` = 21 classes with a "background" text prompt as class 0 (MaskCLIP / mmseg
  convention; the background class competes like any other); ``mode 20`` = the 20 object classes only, GT
  background pixels (id 0) become ``ignore_index`` and GT ids 1..20 become 0..19 (see :func:`voc_gt_transform`),
  predicted PNGs are written with ids + 1 so they keep the dataset's ids.
* Sliding-window inference (:func:`clips4.trainer.inference.sliding_window_embed`) averages the overlapping windows' embeddings
  (mmseg ``slide_inference`` grid: windows start at multiples of ``stride``, the last one is aligned to the
  border).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from clips4.evaluate.compat import check_width, source_width
from clips4.evaluate.metrics import ConfusionMatrix
from clips4.evaluate.palette import save_indexed_png
from clips4.evaluate.sources import (EmbeddingSource, config_summary, embedding_source, resolve_classes,
                                     source_text_embeddings, text_embeddings_for)
from clips4.pipeline.config import Config
from clips4.pipeline.datasets import Dataset
from clips4.pipeline.images import load_rgb
from clips4.pipeline.safepath import output_path
from clips4.trainer.inference import similarity_logits

__all__ = [
    "predict_labels",
    "run_language",
    "language_confusion",
    "voc_gt_transform",
    "voc_text_subset",
    "evaluate_language",
]


def predict_labels(
    pixel_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    out_size: tuple[int, int] | None = None,
    *,
    layout: str = "auto",
    upsample: str = "logits",
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Arg-max over cosine similarity to ``text_emb`` (K, D) (plus ``bias (K,)``, the class-prior correction of
    :mod:`clips4.trainer.calibration`, when given) -> ``(H, W) int64`` class ids ``0..K-1``.

    ``pixel_emb`` is ``(h, w, D)`` or ``(D, h, w)`` (``layout="auto"`` picks the axis whose size is D; pass
    ``"hwd"`` / ``"dhw"`` when ambiguous). ``out_size=(H, W)`` resizes bilinearly (logits by default)."""
    d_text = np.shape(text_emb)[-1]
    if d_text not in np.shape(pixel_emb):  # same message whichever source; no numpy/torch shape error
        from clips4.evaluate.compat import check_width

        dims = np.shape(pixel_emb)
        check_width(dims[-1] if layout != "dhw" else dims[0], d_text, source="the pixel embeddings",
                    against="the text embeddings")
    with torch.no_grad():
        logits = similarity_logits(pixel_emb, text_emb, out_size, layout=layout, upsample=upsample)
        if bias is not None:
            logits = logits + torch.as_tensor(np.asarray(bias, np.float32), device=logits.device)[:, None, None]
        return logits.argmax(0).cpu().numpy().astype(np.int64)


def voc_gt_transform(gt: np.ndarray, mode: int | str = 21, ignore_index: int = 255) -> np.ndarray:
    """VOC ground truth for the chosen mode: 21 -> unchanged; 20 -> background (0) ignored, ids 1..20 -> 0..19."""
    mode = int(mode)
    gt = np.asarray(gt).astype(np.int64)
    if mode == 21:
        return gt
    if mode != 20:
        raise ValueError(f"VOC mode must be 20 or 21, got {mode}")
    out = gt - 1
    out[(gt == 0) | (gt == ignore_index)] = ignore_index
    return out


def voc_text_subset(class_names: Sequence[str], text_emb: np.ndarray, mode: int | str = 21):
    """(names, text embeddings) for the mode, given the 21 VOC names/embeddings with background first."""
    if int(mode) == 21:
        return list(class_names), text_emb
    if int(mode) == 20:
        return list(class_names)[1:], np.asarray(text_emb)[1:]
    raise ValueError(f"VOC mode must be 20 or 21, got {mode}")


def evaluate_language(
    records: Iterable,
    gt_loader: Callable[[object], np.ndarray],
    embed_source: Callable[[object], np.ndarray],
    text_emb: np.ndarray,
    class_names: Sequence[str],
    ignore_index: int = 255,
    save_predictions: str | Path | None = None,
    *,
    gt_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    save_offset: int = 0,
    upsample: str = "logits",
    confusion: ConfusionMatrix | None = None,
    bias: np.ndarray | None = None,
) -> dict:
    """Language-driven segmentation over ``records`` -> mIoU etc. (:meth:`ConfusionMatrix.to_dict`).

    ``gt_loader(record) -> (H, W)`` ids (255 ignore), ``embed_source(record) -> (h, w, D)`` pixel embeddings;
    ``text_emb (K, D)`` rows match ``class_names``. ``gt_transform`` maps GT ids into ``0..K-1`` (e.g.
    ``lambda g: voc_gt_transform(g, 20)``) and ``save_offset`` is added to predicted ids before writing PNGs
    (1 in VOC mode 20) so saved ids equal the dataset's GT ids. PNGs go to ``<save_predictions>/<image_id>.png``.
    Pass ``confusion`` to accumulate into an existing matrix (e.g. one per worker, merged later)."""
    cm = confusion if confusion is not None else ConfusionMatrix(len(class_names), ignore_index)
    if cm.num_classes != len(class_names):
        raise ValueError("confusion matrix size does not match class_names")
    if len(np.asarray(text_emb)) != len(class_names):
        raise ValueError(f"{len(np.asarray(text_emb))} text embeddings for {len(class_names)} class names")
    out_dir = Path(save_predictions) if save_predictions is not None else None
    n = 0
    for rec in records:
        gt = np.asarray(gt_loader(rec))
        if gt_transform is not None:
            gt = gt_transform(gt)
        emb = embed_source(rec)
        pred = predict_labels(emb, text_emb, gt.shape[:2], layout="hwd", upsample=upsample, bias=bias)
        cm.update(pred, gt)
        if out_dir is not None:
            image_id = getattr(rec, "image_id", None) or str(n)
            save_indexed_png(output_path(out_dir, f"{image_id}.png", what="prediction"), pred + save_offset)
        n += 1
    res = cm.to_dict(class_names)
    res["n_images"] = n
    res["upsample"] = upsample
    return res


def language_confusion(src: EmbeddingSource, dataset: Dataset, names: list[str], text: np.ndarray, *,
                       gt_transform=None, save_predictions: Path | None = None, save_offset: int = 0,
                       bias: np.ndarray | None = None):
    """(metrics dict, ConfusionMatrix, records) of language-driven segmentation with ``text`` over ``dataset``."""
    records = [r for r in dataset.records() if r.gt_path]
    if not records:
        raise ValueError(f"dataset {dataset.kind} at {dataset.root} (split {dataset.split}) has no ground truth to evaluate against")
    check_width(source_width(src), np.shape(text)[-1], source=src.info.get("checkpoint", src.name),
                against="the text embeddings of the configured CLIP backend")
    cm = ConfusionMatrix(len(names), dataset.ignore_index)
    res = evaluate_language(records, dataset.load_gt, src.embed, text, names, dataset.ignore_index, save_predictions,
                            gt_transform=gt_transform, save_offset=save_offset, confusion=cm, bias=bias)
    return res, cm, records


def run_language(cfg: Config, dataset: Dataset, *, model: str = "teacher", classes: str | None = None,
                 voc_mode: int = 21, save_predictions: Path | None = None, out: Path | None = None,
                 device: str = "auto", overlays: int = 4, prior_matching: str | None = "checkpoint",
                 prior_images: int = 512, prior_mode: str = "band", prior_collapse_ratio: float | None = None,
                 prior_guard: bool = True) -> dict:
    """Language-driven segmentation over ``dataset``: mIoU, per-class IoU, pixel accuracy; report in ``out``.

    ``prior_matching``: the class calibration of a checkpoint (:mod:`clips4.trainer.calibration`): ``checkpoint``
    (the default) applies the one ``clips4 train`` stored in it when the evaluated classes and texts are the
    calibrated ones (otherwise none, and the results say why); ``none`` = plain arg-max; a split of the same
    dataset (e.g. ``train``) refits it on that split's first ``prior_images`` images (their cached teacher features,
    no labels) with ``prior_mode`` (``band``, as ``train.calibration`` by default). Recorded under
    ``prior_matching`` in the results. Not applied to the teacher, which is the reference it matches.
    ``prior_collapse_ratio``: the collapse guard's trigger (``prior_mode`` ``raise`` or ``band``; default
    :data:`clips4.trainer.calibration.COLLAPSE_RATIO`). ``prior_guard``: keep only the fraction of a refitted bias
    that agrees best with the teacher's labels, as ``train.calibration_guard`` (on by default)."""
    from clips4.evaluate.report import write_report

    if int(voc_mode) not in (20, 21):
        raise ValueError(f"--voc-mode must be 20 or 21, got {voc_mode}")
    if dataset.kind == "voc" and classes in ("voc", "voc20", "voc21"):  # the bundled VOC lists are the two modes
        voc_mode, classes = (21 if classes == "voc21" else 20), None
    src = embedding_source(cfg, dataset, model, device)
    names = resolve_classes(classes, dataset)
    gt_transform = None
    save_offset = 0
    if dataset.kind == "voc" and not classes:
        if voc_mode == 20:
            names = names[1:]
            gt_transform = lambda g: voc_gt_transform(g, 20)  # noqa: E731
            save_offset = 1
    text, backend_info = (text_embeddings_for(cfg, names) if model == "teacher"
                          else source_text_embeddings(cfg, src, names))
    bias, prior = None, None
    if prior_matching == "checkpoint" and model != "teacher":
        from clips4.trainer.calibration import stored_bias

        cal = src.calibration
        # VOC-21: background is no trained class (the prototypes are the 20 objects); it competes unbiased
        extra = ("background",) if dataset.kind == "voc" and not classes and voc_mode == 21 else ()
        bias, why = stored_bias(cal, names, text, uncalibrated=extra)
        prior = ({"source": "checkpoint", "applied": True, "mode": cal.get("mode"), "collapse_ratio": cal.get("collapse_ratio"),
                  "n_images": cal.get("n_images"), "bias": [float(b) for b in bias], "classes": names,
                  "capped": [n for n in cal.get("capped", []) if n in names]}
                 if bias is not None else {"source": "checkpoint", "applied": False, "why": why})
    elif prior_matching not in (None, "none", "checkpoint") and model != "teacher":
        prior = _prior_matching(cfg, src, text, prior_matching, prior_images, prior_mode, prior_collapse_ratio,
                                guard=prior_guard)
        bias = np.asarray(prior["bias"], np.float32)
        prior = {**prior, "bias": [float(b) for b in bias], "split": prior_matching, "source": "split",
                 "classes": names, "capped": [names[i] for i in prior["capped"]]}
    res, cm, records = language_confusion(src, dataset, names, text, gt_transform=gt_transform,
                                          save_predictions=save_predictions, save_offset=save_offset, bias=bias)
    res["prior_matching"] = prior
    res["protocol"] = protocol_line(dataset, voc_mode, classes, model, prior)
    res.update({"task": "language", "method": src.name, "model": src.name, "dataset": dataset.describe(),
                "classes": names, "voc_mode": voc_mode if dataset.kind == "voc" else None, "embedding": src.info})
    if out is not None:
        shown = []
        for rec in records[:overlays]:
            img = load_rgb(rec.path)
            gt = dataset.load_gt(rec)
            if gt_transform is not None:
                gt = gt_transform(gt)
            shown.append((img, predict_labels(src.embed(rec), text, gt.shape, layout="hwd", bias=bias), gt, rec.image_id))
        res["report"] = {k: str(v) for k, v in write_report(
            out, res, title=f"language-driven segmentation — {src.name} on {dataset.key} ({res['protocol']})",
            class_names=names,
            confusion=cm, overlays=shown, config=config_summary(cfg),
            fingerprints={"embeddings": src.fingerprint, "text_backend": backend_info}).items()}
    return res


def protocol_line(dataset: Dataset, voc_mode: int, classes: str | None, model: str, prior: dict | None) -> str:
    """How a language result was measured, in words every report prints: the class set (VOC-20 / VOC-21 or the
    list) and the class calibration."""
    if dataset.kind == "voc" and not classes:
        what = ("VOC-21: background prompt + 20 objects" if voc_mode == 21 else
                "VOC-20: 20 objects, background pixels ignored")
    else:
        what = f"classes: {classes}" if classes else "the dataset's classes"
    if model == "teacher":
        cal = "no calibration (teacher)"
    elif not prior:
        cal = "no calibration"
    elif prior.get("applied") is False:
        cal = "no calibration (" + str(prior.get("why", "")) + ")"
    elif prior.get("source") == "checkpoint":
        cal = f"calibration stored in the checkpoint ({prior.get('mode')})"
    else:
        cal = f"calibration fitted on '{prior.get('split')}' ({prior.get('mode')})"
    return f"{what}; {cal}"


def _prior_matching(cfg: Config, src: EmbeddingSource, text: np.ndarray, split: str, n_images: int,
                    mode: str = "match", collapse_ratio: float | None = None, guard: bool = True) -> dict:
    """The class-prior correction of ``src`` fitted on ``split``'s cached teacher features (no labels read)."""
    from clips4.trainer.calibration import COLLAPSE_RATIO, cached_teacher, prior_bias
    from clips4.evaluate.sources import with_split
    from clips4.pipeline.stage import dataset_from_config, open_stage

    ccfg = with_split(cfg, split)
    cds = dataset_from_config(ccfg)
    feats, segs = open_stage(ccfg, "clip_features", cds), open_stage(ccfg, "segments", cds)
    records = list(cds.records())[: max(1, int(n_images))]

    pooled = cached_teacher(feats, segs)  # the teacher exactly as clips4 train calibrates against it

    def teacher(r, hw):
        return similarity_logits(pooled(r), text, hw, layout="hwd")

    with torch.no_grad():
        return prior_bias(
            records, lambda r: similarity_logits(src.embed(r), text, layout="hwd"), teacher,
            mode=mode, collapse_ratio=COLLAPSE_RATIO if collapse_ratio is None else collapse_ratio, guard=guard)
