"""The code of the pipeline stages that stages.yaml names (`run:`): per-image processors and the prototypes builder
(the stage protocol: :func:`clips4.pipeline.config.stage_object`; docs/design.md, "Adding a stage or a backend").

A processor is built once per worker (models and detectors load once) and called on batches of records.
It never raises for one bad image: that image becomes a failed ``ItemResult`` whose message names it.
"""
from __future__ import annotations

import time

import numpy as np

from clips4.pipeline.cache import ItemResult, float_rows
from clips4.pipeline.config import ClipFeaturesParams, ClipParams, PrototypesParams, SegmentsParams
from clips4.pipeline.datasets import ImageRecord
from clips4.pipeline.images import ImageError, load_rgb
from clips4.pipeline.limits import check_image_size, check_memory, header_hw, item_budget, resized_size, time_limit


def _fail(rec: ImageRecord, exc: BaseException) -> ItemResult:
    if isinstance(exc, ImageError):
        return ItemResult.failed(str(exc))
    return ItemResult.failed(f"{rec.path}: {type(exc).__name__}: {exc}")


def segments_preflight(params: SegmentsParams) -> dict:
    """Build the detector once in the driver: unknown names or missing model files fail before fan-out."""
    from clips4.pipeline.contours import build_detector

    build_detector(params.detector, **params.detector_params)
    return {"detector": params.detector}


class SegmentsProcessor:
    """contours → OWT-UCM → superpixels. Arrays: ``contours`` (H,W) uint8, ``orientation`` (H,W) uint8, ``ucm``
    (see segments.py), ``labels`` (H,W) int32; row: ``n_segments``."""

    kind = "per_image"
    #: 2: the default detector is the learned one (a retrained data/contours/edgenet.onnx bumps it again)
    version = "2"
    Params = SegmentsParams
    preflight = staticmethod(segments_preflight)

    def __init__(self, params: SegmentsParams, ctx: dict | None = None):
        from clips4.pipeline.contours import build_detector

        self.params = params
        self.detector = build_detector(params.detector, **params.detector_params)
        #: bytes one image may take here (see clips4.pipeline.limits.item_budget), measured after the detector
        self.memory_budget = item_budget(ctx)

    def __call__(self, records: list[ImageRecord]) -> list[ItemResult]:
        from clips4.pipeline.segments import compute_segments

        out = []
        for rec in records:
            t0 = time.perf_counter()
            try:
                h, w = header_hw(rec)
                check_memory(rec.path, h, w, "segments", self.memory_budget)
                with time_limit(self.params.item_timeout_s, rec.path):
                    image = load_rgb(rec.path, max_pixels=self.params.max_pixels)
                    arrays = compute_segments(
                        image, self.detector, ucm_threshold=self.params.ucm_threshold,
                        max_segments=self.params.max_segments, min_area=self.params.min_area,
                    )
                labels = arrays["labels"]
                out.append(ItemResult(
                    row={"n_segments": int(labels.max()) + 1 if labels.size else 0, "seconds": time.perf_counter() - t0},
                    arrays=arrays,
                ))
            except Exception as exc:  # noqa: BLE001 - recorded per image
                out.append(_fail(rec, exc))
        return out


def segment_row_ids(image_id: str, segment_ids) -> np.ndarray:
    """Dataset-wide segment ids that do not depend on which worker or part wrote them:
    48 bits of sha1(image_id), then 12 bits of the per-image segment id. ``(N,) int64``."""
    import hashlib

    seg = np.asarray(segment_ids, dtype=np.int64)
    if seg.size and (seg.min() < 0 or seg.max() >= 4096):
        raise ValueError(f"{image_id}: segment ids must be in [0, 4096) to form row ids")
    base = int(hashlib.sha1(image_id.encode("utf-8", "surrogateescape")).hexdigest()[:12], 16)
    return (np.int64(base) << np.int64(12)) | seg


def _model_name(model: str) -> str:
    """``model`` may be an open_clip name or a model-config JSON file (registered here, in every process)."""
    if model.endswith(".json"):
        import os

        import open_clip

        if not os.path.isfile(model):
            raise FileNotFoundError(f"CLIP model config {model} not found")
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    return model


def build_backend(clip: "ClipParams"):
    """The vision-language backend named by ``clip`` params (open_clip by default, or an import path).
    A bad model name, weight file or backend spec is a :class:`ConfigError` naming it."""
    with _clip_config_errors():
        return _build_backend(clip)


class _clip_config_errors:
    """ValueErrors of model / weights resolution are configuration mistakes (exit 2, no traceback)."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        from clips4.pipeline.clip.weights import WeightsNotFoundError
        from clips4.pipeline.config import ConfigError

        if exc is not None and isinstance(exc, ValueError) and not isinstance(exc, (ConfigError, WeightsNotFoundError)):
            raise ConfigError(f"clip_features.clip: {exc}") from exc
        return False


def _build_backend(clip: "ClipParams"):
    from clips4.pipeline.backends import load_backend

    if clip.backend in (None, "open_clip", "openclip"):
        return load_backend(
            None, model=_model_name(clip.model), pretrained=clip.pretrained, checkpoint=clip.checkpoint, variant=clip.variant,
            short_side=clip.short_side, window=clip.window, stride=clip.stride, batch_size=clip.batch_size,
            device=None if clip.device == "auto" else clip.device, precision=clip.precision,
            cache_dir=clip.cache_dir, offline=clip.offline,
        )
    return load_backend(clip.backend, **clip.backend_params)


def _check_variant_params(vp: dict) -> None:
    """Unknown ``variant_params`` keys are a config error naming the valid ones (before any image is read)."""
    from clips4.pipeline.config import ConfigError
    from clips4.pipeline.photometric import PhotometricConfig

    valid = list(PhotometricConfig.model_fields)
    bad = sorted(set(vp) - set(valid))
    if bad:
        raise ConfigError(f"clip_features.variant_params: unknown {bad}; valid: {', '.join(valid)}")


def clip_features_preflight(params: ClipFeaturesParams) -> dict:
    """Resolve the CLIP weights in the driver (seconds, no model build): missing weights fail before fan-out.

    Returns what meta.json records: model, weights (tag or path) and the weight file's sha256.
    """
    _check_variant_params(params.variant_params)
    clip = params.clip
    if clip.backend not in (None, "open_clip", "openclip"):
        backend = build_backend(clip)
        return {"backend": clip.backend, "info": backend.info()}
    from clips4.pipeline.clip.weights import resolve_weights
    from clips4.pipeline.io import file_sha256

    with _clip_config_errors():
        w = resolve_weights(_model_name(clip.model), clip.checkpoint or clip.pretrained, cache_dir=clip.cache_dir,
                            offline=clip.offline)
    facts = {"backend": "open_clip", "model": clip.model, "pretrained": clip.checkpoint or clip.pretrained,
             "weight_file": w.weight_file, "sha256": file_sha256(w.weight_file), "variant": clip.variant}
    if w.source == "local-dir":  # the folder's open_clip_config.json defines the architecture, not clip.model
        facts["model"] = w.model_name
        facts["architecture"] = _local_dir_architecture(w.model_name[len("local-dir:"):])
    return facts


def _local_dir_architecture(folder: str) -> dict:
    """The model config of a ``local-dir:`` CLIP folder (embed_dim, vision and text towers), for meta.json."""
    import json
    from pathlib import Path

    try:
        doc = json.loads((Path(folder) / "open_clip_config.json").read_text())
    except (OSError, ValueError):
        return {}
    cfg = doc.get("model_cfg", doc)
    return {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu") if k in cfg}


class ClipFeaturesProcessor:
    """CLIP dense pixel embeddings (clip-i) + CLIP segment embeddings per image.

    Arrays: ``features`` (h, w, D) float16, L2-normalised, at the backend's patch grid (cell (i, j) covers
    image rows [i*H/h, (i+1)*H/h) and columns [j*W/w, (j+1)*W/w)); ``segment_labels`` (h, w) int32, the
    segments Ŝ at the feature grid. Table ``segments``: one row per segment with ``segment_id``,
    ``embedding`` (D float32, normalised mean CLIP embedding; raw float32 rows, :func:`clips4.pipeline.cache.float_rows_numpy` reads them), ``area`` (grid cells) and ``bbox``
    (y0, x0, y1, x1 in image pixels). Decoding runs in a thread pool, overlapping the model's forward passes.
    """

    kind = "per_image"
    #: 2: image-resolution labels map to grid cells by pixel centres (clips4.pipeline.grid); 3: variant transforms
    #: carry a channel permutation and an inversion (``variant_ops`` (V, 13)); 4: ``embedding`` stored as raw float32
    #: rows (``fixed_size_binary``, clips4.pipeline.cache.float_rows)
    version = "4"
    Params = ClipFeaturesParams

    preflight = staticmethod(clip_features_preflight)

    @staticmethod
    def active_deps(params: ClipFeaturesParams, deps: list[str]) -> list[str]:
        """The segments stage is read only when the CLIP segments are the UCM superpixels."""
        if params.segment_source == "ucm" and "segments" not in deps:
            from clips4.pipeline.config import ConfigError

            raise ConfigError("clip_features with segment_source: ucm reads the segments stage: add segments to "
                              "stages.clip_features.deps")
        return [d for d in deps if d != "segments" or params.segment_source == "ucm"]

    def __init__(self, params: ClipFeaturesParams, ctx: dict | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.params = params
        self.backend = build_backend(params.clip)
        self.segments = None
        if params.segment_source == "ucm":
            from clips4.pipeline.cache import StageReader

            self.segments = StageReader((ctx or {})["deps"]["segments"])
        self.pool = ThreadPoolExecutor(max_workers=2)
        #: bytes one image may take here (see clips4.pipeline.limits.item_budget), measured after the model
        self.memory_budget = item_budget(ctx)

    def _checked_load(self, rec: ImageRecord):
        """A future of the decoded image; the size limits are checked from the header first (no decoding)."""
        from concurrent.futures import Future

        p = self.params
        h, w = header_hw(rec)
        try:
            check_image_size(rec.path, h, w, max_pixels=p.max_pixels, max_aspect_ratio=p.max_aspect_ratio,
                             resized=resized_size(h, w, p.clip.short_side, p.clip.window) if h > 0 and w > 0 else None,
                             max_resized_side=p.max_resized_side, stage="clip_features")
            check_memory(rec.path, h, w, "clip_features", self.memory_budget)
        except ImageError as exc:
            fut: Future = Future()
            fut.set_exception(exc)
            return fut
        return self.pool.submit(load_rgb, rec.path, max_pixels=p.max_pixels)

    def _segments_for(self, rec: ImageRecord, feat: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        from clips4.pipeline.prototypes import cluster_segments, labels_to_grid

        if self.segments is None:
            return cluster_segments(feat, n_clusters=self.params.n_clusters, seed=self.params.seed)
        return labels_to_grid(self.segments.get(rec.image_id, "labels"), feat.shape[:2])

    def __call__(self, records: list[ImageRecord]) -> list[ItemResult]:
        from clips4.pipeline.prototypes import segment_embeddings

        futures = [self._checked_load(r) for r in records]
        out = []
        for rec, fut in zip(records, futures):
            t0 = time.perf_counter()
            try:
                with time_limit(self.params.item_timeout_s, rec.path):
                    image = fut.result()
                    feat = self.backend.dense_features([image])[0]
                labels = self._segments_for(rec, feat, image.shape[:2])
                seg = dict(segment_embeddings(feat, labels, image_hw=image.shape[:2]))
                seg["row_id"] = segment_row_ids(rec.image_id, seg["segment_id"])
                seg["embedding"] = float_rows(seg["embedding"])
                arrays = {"features": feat.astype(np.float16), "segment_labels": labels.astype(np.int32)}
                if self.params.photometric_variants:
                    from clips4.pipeline.photometric import teacher_variants

                    arrays.update(teacher_variants(self.backend, image, rec.image_id, self.params))
                out.append(ItemResult(
                    row={"grid_h": int(feat.shape[0]), "grid_w": int(feat.shape[1]), "n_segments": len(seg["segment_id"]),
                         "seconds": time.perf_counter() - t0},
                    arrays=arrays,
                    tables={"segments": seg},
                ))
            except Exception as exc:  # noqa: BLE001 - recorded per image
                out.append(_fail(rec, exc))
        return out


def _search_device() -> str | None:
    """``"cuda"`` where torch sees a GPU (the prototype search's GEMMs run there), else None (numpy)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _teacher_invariances(backend, feats, protos, params: "PrototypesParams") -> dict:
    """:func:`clips4.pipeline.invariances.measure_invariances` on ``params.invariance_images`` training images
    (a seeded choice), classes read by the known prototypes (all prototypes when class-free)."""
    import hashlib

    from clips4.pipeline.console import make_console
    from clips4.pipeline.invariances import measure_invariances

    n = int(params.invariance_images) if backend is not None else 0
    ids = sorted(feats.image_ids, key=lambda i: hashlib.sha256(f"{params.seed}/{i}".encode()).digest()) if n else []
    images = []
    for i in ids:  # an image gone unreadable since its features were cached is skipped (said), the next one taken
        if len(images) == n:
            break
        try:
            images.append(load_rgb(feats.record(i).path))
        except ImageError as exc:
            make_console(stderr=True).print(f"  teacher invariances: skipping {i}: {exc}", markup=False)
    vecs = protos.vectors[protos.known_mask] if protos.n_known else protos.vectors
    if not images:
        return measure_invariances(backend, images, vecs, seed=params.seed)
    from clips4.pipeline.invariances import passes_per_image
    from clips4.pipeline.progress import make_progress

    with make_progress(f"prototypes: teacher invariances ({passes_per_image()} teacher passes per image)",
                       len(images), show=True, every_s=15.0) as bar:
        return measure_invariances(backend, images, vecs, seed=params.seed, progress=lambda k: bar.update(k, 0))


def build_prototypes(params: "PrototypesParams", deps: dict[str, str], out_url: str,
                     image_ids: list[str] | None = None) -> list[str]:
    """Known prototypes (top-m segments per class, FAISS) + unknown ones, from the clip_features cache (only the
    images in ``image_ids``, the config's selection, where given).

    Writes ``prototypes.parquet`` (name, kind, vector, support ids) and ``text.parquet`` (class text
    embeddings of the classes' prompt names over the 85 templates; rows keep the dataset's names); returns their names. The segments table is streamed, never loaded whole.
    """
    import pyarrow as pa

    import json

    from clips4 import data as bundled
    from clips4.pipeline.backends import class_text_embeddings
    from clips4.pipeline.cache import StageReader, url_join, write_bytes_atomic, write_parquet_atomic
    from clips4.pipeline.config import ClipFeaturesParams
    from clips4.pipeline.prototypes import PrototypeSet, iter_embedding_batches, known_prototypes, unknown_prototypes

    feats = StageReader(deps["clip_features"])
    if image_ids is not None:
        feats.restrict(image_ids)
    cf = ClipFeaturesParams.model_validate(feats.meta["params"])

    def batches():
        return iter_embedding_batches(feats.iter_table("segments", columns=["row_id", "embedding"]))

    names: list[str] = []
    known = np.zeros((0, 0), np.float32)
    support = np.zeros((0, params.top_m), np.int64)
    text = None
    backend = build_backend(cf.clip) if params.classes or params.invariance_images else None
    if params.classes:
        names = bundled.class_names(params.classes)
        text = class_text_embeddings(backend, names)
        known, support = known_prototypes(batches(), text, backend.logit_scale, top_m=params.top_m,
                                          device=_search_device())
    unknown, unknown_ids = unknown_prototypes(batches(), u=params.n_unknown, seed=params.seed, text_emb=text,
                                              logit_scale=backend.logit_scale if text is not None else 100.0,
                                              pool=params.unknown_pool)
    protos = PrototypeSet.from_parts(names, known, support, unknown, unknown_ids)
    from clips4.pipeline.console import make_console

    make_console(stderr=True).print(f"  prototypes: {protos.n_known} known ({params.classes or 'class-free'}) + "
                               f"{protos.n_unknown} unknown (seed {params.seed}), dim {protos.dim}")
    write_parquet_atomic(url_join(out_url, "prototypes.parquet"), protos.to_table())
    files = ["prototypes.parquet", "invariances.json"]
    inv = _teacher_invariances(backend, feats, protos, params)
    make_console(stderr=True).print("  teacher invariances (1 = as stable as the teacher itself): " + (", ".join(
        f"{k} {v:.2f}" for k, v in inv["families"].items()) or "not measured"))
    write_bytes_atomic(url_join(out_url, "invariances.json"), json.dumps(inv, indent=1).encode())
    if text is not None:
        t = pa.table({"name": names, "vector": pa.FixedSizeListArray.from_arrays(pa.array(text.astype(np.float32).reshape(-1)), text.shape[1])})
        write_parquet_atomic(url_join(out_url, "text.parquet"), t)
        files.append("text.parquet")
    return files


class PrototypesBuilder:
    """The prototypes stage: a whole-dataset builder (see :func:`build_prototypes`)."""

    kind = "builder"
    #: 2: class prompts use the natural-language names (clips4.data.prompt_names); 3: unknown prototypes drawn from
    #: the segments least explained by the known classes (``unknown_pool``), and ``invariances.json``: the teacher's
    #: measured photometric invariances (``invariance_images``, read by ``train.augment.photometric: auto``); 4: with
    #: the per-region families (``local_*``, read by ``train.augment.regions: auto``)
    version = "4"
    Params = PrototypesParams
    build = staticmethod(build_prototypes)
