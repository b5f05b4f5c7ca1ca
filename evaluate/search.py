"""Language-driven segment search (paper Fig. 4b): a FAISS inner-product index over segment embeddings and a
contact sheet of the hits.

    index = SegmentIndex.load_or_build("cache/search/index.faiss", lambda: iter_embedding_batches(segments))
    hits = index.query(text_embeddings(backend, ["a red car"], templates)[0], top=16)   # [(row_id, score)]
    contact_sheet([{"image_path": ..., "bbox": (y0, x0, y1, x1), "score": s, "image_id": ..., "segment_id": ...}],
                  "car.png", title="a red car")
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = ["SegmentIndex", "contact_sheet", "render_tile", "segment_mask", "search_segments"]


class SegmentIndex:
    """FAISS inner-product index over L2-normalised segment embeddings (so scores are cosine similarities).

    Rows are identified by the ids given with each batch (e.g. the segments table's ``row_id``); an
    ``faiss.IndexIDMap`` maps FAISS's internal positions to them. ``factory`` is a FAISS index-factory string:
    ``"Flat"`` (exact; default — 10^6 x 512 floats is 2 GiB and a query is one pass), or e.g. ``"HNSW32"``
    (approximate, no training). Factories that need training (``"IVF1024,Flat"``) are trained on the first batch,
    which must then hold enough rows (FAISS asks for ~39 per centroid).
    """

    def __init__(self, index, path: str | None = None):
        self.index = index
        self.path = path

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(cls, batches: Iterable, *, factory: str = "Flat", path: str | None = None) -> "SegmentIndex":
        """Build from ``(ids (n,) int64, emb (n, D) float32)`` batches (or bare ``(n, D)`` arrays: ids are then the
        running row numbers), streamed; written to ``path`` when given."""
        import faiss

        index = None
        offset = 0
        for b in batches:
            if isinstance(b, np.ndarray):
                ids, emb = np.arange(offset, offset + len(b), dtype=np.int64), b
            else:
                ids, emb = b
            emb = np.ascontiguousarray(emb, dtype=np.float32)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            offset += len(emb)
            if len(emb) == 0:
                continue
            if index is None:
                inner = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
                if not inner.is_trained:
                    inner.train(emb)
                index = faiss.IndexIDMap(inner)
            index.add_with_ids(emb, ids)
        if index is None:
            raise ValueError("SegmentIndex.build: no segment embeddings to index")
        out = cls(index)
        if path:
            out.save(path)
        return out

    def save(self, path: str) -> None:
        """Write the index to ``path`` (atomically: a temporary file in the same folder, then a rename)."""
        import faiss

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=str(p.parent))
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.path = str(p)

    @classmethod
    def load(cls, path: str) -> "SegmentIndex":
        import faiss

        if not Path(path).is_file():
            raise FileNotFoundError(f"no segment index at {path}")
        return cls(faiss.read_index(str(path)), str(path))

    @classmethod
    def load_or_build(cls, path: str, batches_fn: Callable[[], Iterable], *, factory: str = "Flat") -> "SegmentIndex":
        """The cached index at ``path``, or build it from ``batches_fn()`` and save it there (built once)."""
        if Path(path).is_file():
            return cls.load(path)
        return cls.build(batches_fn(), factory=factory, path=path)

    def query(self, text_emb: np.ndarray, top: int = 16) -> list[tuple[int, float]]:
        """The ``top`` rows most similar to one ``(D,)`` embedding: ``[(row_id, cosine), ...]``, best first."""
        return self.query_batch(np.asarray(text_emb, np.float32).reshape(1, -1), top)[0]

    def query_batch(self, text_emb: np.ndarray, top: int = 16) -> list[list[tuple[int, float]]]:
        """``(Q, D)`` queries -> one ``[(row_id, score), ...]`` list per query."""
        q = np.ascontiguousarray(np.asarray(text_emb, np.float32).reshape(-1, self.dim))
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.dim}")
        k = max(1, min(int(top), self.ntotal))
        scores, ids = self.index.search(q, k)
        return [[(int(i), float(s)) for i, s in zip(ii, ss) if i >= 0] for ii, ss in zip(ids, scores)]


# ================================================================================================ contact sheet
def segment_mask(feats, image_id: str, segment_id: int) -> np.ndarray:
    """``(H, W) bool`` mask of one CLIP segment of a clip_features output (a ``StageReader``). When the segments are
    the superpixels of the segments stage (``segment_source: ucm``) the mask is the superpixel at image resolution;
    k-means segments exist only at the feature grid, so their mask is ``(h, w)`` (the contact sheet resizes it)."""
    dep = (feats.meta.get("deps") or {}).get("segments")
    if dep and dep.get("url"):
        from clips4.pipeline.cache import StageReader

        try:
            return np.asarray(StageReader(dep["url"]).get(image_id, "labels")) == int(segment_id)
        except Exception:  # noqa: BLE001 - the segments output was cleaned away: the grid mask still shows it
            pass
    return np.asarray(feats.get(image_id, "segment_labels")) == int(segment_id)


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib, a dependency) at ``size`` px: the fonts Pillow bundles draw spaces so
    narrow that a query's words run together."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):  # pragma: no cover - no matplotlib / no FreeType
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bool mask resized to ``hw``; a coarser mask (the feature grid) is interpolated, so its blocks become
    rounded regions instead of a staircase."""
    from PIL import Image

    mask = np.asarray(mask).astype(bool)
    if mask.shape == tuple(hw):
        return mask
    smooth = mask.shape[0] < hw[0] and mask.shape[1] < hw[1]
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.BILINEAR if smooth else Image.NEAREST)
    return np.asarray(im) >= 128


def render_tile(image: np.ndarray, mask: np.ndarray | None, bbox=None, *, thumb: int = 192, context: float = 0.25,
                color: tuple[int, int, int] = (255, 40, 40)) -> tuple[np.ndarray, np.ndarray | None]:
    """One contact-sheet tile: the crop around a segment (its box grown by ``context`` of its size on each side),
    scaled so its longer side is ``thumb``. With a mask (any resolution) the segment is shown filled: pixels
    outside it are washed out (grey, light), pixels inside keep the image and its boundary is drawn in ``color``
    on the inside of the segment. With only a ``bbox`` (``y0, x0, y1, x1``) the box is drawn.
    Returns ``(tile (h, w, 3) uint8, mask at tile resolution (h, w) bool or None)``."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    H, W = img.shape[:2]
    if mask is not None:
        mask = _resize_mask(mask, (H, W))
        if bbox is None and mask.any():
            ys, xs = np.nonzero(mask)
            bbox = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    if bbox is None:
        bbox = (0, 0, H, W)
    y0, x0, y1, x1 = (int(v) for v in bbox)
    gy, gx = int((y1 - y0) * context), int((x1 - x0) * context)
    cy0, cx0, cy1, cx1 = max(0, y0 - gy), max(0, x0 - gx), min(H, y1 + gy), min(W, x1 + gx)
    pil = Image.fromarray(np.ascontiguousarray(img[cy0:cy1, cx0:cx1]))
    scale = thumb / max(pil.width, pil.height, 1)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    pil = pil.resize(size, Image.BICUBIC)
    if mask is None:
        ImageDraw.Draw(pil).rectangle([(x0 - cx0) * scale, (y0 - cy0) * scale, (x1 - cx0) * scale - 1,
                                       (y1 - cy0) * scale - 1], outline=color, width=2)
        return np.asarray(pil), None
    m = _resize_mask(mask[cy0:cy1, cx0:cx1], (size[1], size[0]))
    tile = np.asarray(pil).astype(np.float32)
    col = np.asarray(color, np.float32)
    # the segment keeps its colours; the rest is washed out (grey, light), so dark and bright segments both stand out
    faded = 0.4 * tile.mean(axis=2, keepdims=True) + 0.6 * 235
    out = np.where(m[..., None], tile, faded)
    # a 2-pixel line along the inside of the segment's boundary (not along the crop's edge)
    edge = m & ~ndimage.binary_erosion(m, iterations=2, border_value=1)
    out[edge] = col
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), m


def contact_sheet(
    hits: Sequence[dict],
    out_png: str,
    title: str = "",
    *,
    cols: int = 4,
    thumb: int = 192,
    context: float = 0.25,
    color: tuple[int, int, int] = (255, 40, 40),
    load_image: Callable[[str], np.ndarray] | None = None,
) -> str:
    """A grid of image crops around the hit segments with their scores (as the paper's Fig. 4b), under ``title``.

    Each hit is a dict with ``image_path`` (or ``image``: an ``(H, W, 3) uint8`` array), ``score``, and the
    segment as ``mask`` (``(H, W)`` bool at image resolution, or coarser, e.g. the feature grid: interpolated)
    and/or ``bbox`` (``y0, x0, y1, x1`` in image pixels, end exclusive); ``image_id`` / ``segment_id`` go in the
    caption. See :func:`render_tile` for how a segment is drawn. Writes ``out_png`` and returns its path.
    """
    import textwrap

    from PIL import Image, ImageDraw

    if load_image is None:
        from clips4.pipeline.images import load_rgb as load_image
    cols = max(1, min(cols, len(hits) or 1))
    rows = max(1, (len(hits) + cols - 1) // cols)
    font, small, title_font = _font(13), _font(11), _font(16)
    pad, cap_h = 6, 34
    W = cols * (thumb + pad) + pad
    lines = textwrap.wrap(title, max(10, int(W / (0.55 * 16)))) if title else []
    title_h = 20 * len(lines) + (8 if lines else 0)
    Hs = title_h + rows * (thumb + cap_h + pad) + pad
    sheet = Image.new("RGB", (W, Hs), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(lines):
        draw.text((pad, 4 + 20 * i), line, fill=(0, 0, 0), font=title_font)
    for n, hit in enumerate(hits):
        img = hit.get("image")
        if img is None:
            img = load_image(str(hit["image_path"]))
        tile, _ = render_tile(img, hit.get("mask"), hit.get("bbox"), thumb=thumb, context=context, color=color)
        r, c = divmod(n, cols)
        ox = pad + c * (thumb + pad) + (thumb - tile.shape[1]) // 2
        oy = title_h + pad + r * (thumb + cap_h + pad) + (thumb - tile.shape[0]) // 2
        sheet.paste(Image.fromarray(tile), (ox, oy))
        tx, ty = pad + c * (thumb + pad), title_h + pad + r * (thumb + cap_h + pad) + thumb + 2
        score = hit.get("score")
        draw.text((tx, ty), f"#{n + 1}  {score:.3f}" if score is not None else f"#{n + 1}", fill=(0, 0, 0), font=font)
        ident = ":".join(str(hit[k]) for k in ("image_id", "segment_id") if hit.get(k) is not None)
        if ident:
            draw.text((tx, ty + 16), ident[:40], fill=(90, 90, 90), font=small)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return str(out_png)


def search_segments(cfg, query: str, *, top: int = 16, templates: bool = False, out: str | Path | None = None) -> list[dict]:
    """The ``top`` cached CLIP segments closest to ``query`` (the clip_features stage of ``cfg``'s dataset), best
    first, as ``{"rank", "score", "image_id", "segment_id", "row_id"}``; with ``out``, also their contact sheet.
    The FAISS index is built once per clip_features output and kept beside it (named by its fingerprint)."""
    from clips4.pipeline.backends import class_text_embeddings, text_embeddings
    from clips4.pipeline.cache import url_join
    from clips4.pipeline.config import ClipFeaturesParams
    from clips4.pipeline.processors import build_backend
    from clips4.pipeline.prototypes import iter_embedding_batches
    from clips4.pipeline.stage import dataset_from_config, open_stage

    ds = dataset_from_config(cfg)
    feats = open_stage(cfg, "clip_features", ds)
    index_path = url_join(cfg.cache_root, ds.key, "search", feats.fingerprint, "segments.faiss")
    index = SegmentIndex.load_or_build(
        index_path, lambda: iter_embedding_batches(feats.iter_table("segments", columns=["row_id", "embedding"])))
    backend = build_backend(ClipFeaturesParams.model_validate(feats.meta["params"]).clip)
    # a bare class name is prompted like the classes are (natural-language name, 85 templates)
    text = (class_text_embeddings(backend, [query]) if templates else text_embeddings(backend, [query], ["{}"]))[0]
    hits = index.query(text, top=top)
    wanted = {int(r) for r, _ in hits}
    rows = {}
    for b in feats.iter_table("segments", columns=["row_id", "image_id", "segment_id", "bbox"]):
        ids = b.column("row_id").to_numpy()
        for i in np.flatnonzero(np.isin(ids, list(wanted))):
            rows[int(ids[i])] = {k: b.column(k)[int(i)].as_py() for k in ("image_id", "segment_id", "bbox")}
    found, sheet = [], []
    for rank, (rid, score) in enumerate(hits, 1):
        r = rows[int(rid)]
        found.append({"rank": rank, "score": float(score), "image_id": r["image_id"], "segment_id": r["segment_id"],
                      "row_id": int(rid)})
        if out is not None:
            mask = segment_mask(feats, r["image_id"], r["segment_id"])
            sheet.append({"image_path": feats.row(r["image_id"])["path"], "mask": mask, "bbox": r["bbox"],
                          "score": float(score), "image_id": r["image_id"], "segment_id": r["segment_id"]})
    if out is not None:
        contact_sheet(sheet, str(out), title=query)
    return found
