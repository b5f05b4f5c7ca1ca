"""Per-image processors of the pipeline stages (the Processor protocol of notes/CONTRACTS.md).

A processor is built once per worker (models and detectors load once) and called on batches of records.
It never raises for one bad image: that image becomes a failed ``ItemResult`` whose message names it.
"""
from __future__ import annotations

import time

import numpy as np

from clips4.pipeline.cache import ItemResult
from clips4.pipeline.config import ClipFeaturesParams, SegmentsParams
from clips4.pipeline.datasets import ImageRecord
from clips4.pipeline.images import ImageError, load_rgb


def _fail(rec: ImageRecord, exc: BaseException) -> ItemResult:
    if isinstance(exc, ImageError):
        return ItemResult.failed(str(exc))
    return ItemResult.failed(f"{rec.path}: {type(exc).__name__}: {exc}")


class SegmentsProcessor:
    """contours → OWT-UCM → superpixels. Arrays: ``contours`` (H,W) uint8, ``ucm`` (see segments.py),
    ``labels`` (H,W) int32; row: ``n_segments``."""

    def __init__(self, params: SegmentsParams, ctx: dict | None = None):
        from clips4.pipeline.contours import build_detector

        self.params = params
        self.detector = build_detector(params.detector, **params.detector_params)

    def __call__(self, records: list[ImageRecord]) -> list[ItemResult]:
        from clips4.pipeline.segments import compute_segments

        out = []
        for rec in records:
            t0 = time.perf_counter()
            try:
                image = load_rgb(rec.path, max_pixels=self.params.max_pixels)
                arrays = compute_segments(
                    image, self.detector, ucm_threshold=self.params.ucm_threshold, max_segments=self.params.max_segments
                )
                labels = arrays["labels"]
                out.append(ItemResult(
                    row={"n_segments": int(labels.max()) + 1 if labels.size else 0, "seconds": time.perf_counter() - t0},
                    arrays=arrays,
                ))
            except Exception as exc:  # noqa: BLE001 - recorded per image
                out.append(_fail(rec, exc))
        return out


def clip_features_deps(params: ClipFeaturesParams) -> tuple[str, ...]:
    """clip_features reads the UCM superpixels only when CLIP segments come from them."""
    return ("segments",) if params.segment_source == "ucm" else ()
