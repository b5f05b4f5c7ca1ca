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

__all__ = ["SegmentIndex", "contact_sheet", "search_segments"]


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
def _outline(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    b = find_boundaries(mask, mode="inner")
    return ndimage.binary_dilation(b, iterations=max(0, thickness - 1)) & mask if thickness > 1 else b


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
    """A grid of image crops around the hit segments, outlined, with their scores (as the paper's Fig. 4b).

    Each hit is a dict with ``image_path`` (or ``image``: an ``(H, W, 3) uint8`` array), ``score``, and the
    segment as ``mask`` (``(H, W)`` bool at image resolution, or at any resolution: resized nearest) and/or
    ``bbox`` (``y0, x0, y1, x1`` in image pixels, end exclusive); ``image_id`` / ``segment_id`` go in the caption.
    The crop is the segment's box grown by ``context`` of its size on each side. With a mask the segment's
    boundary is drawn; with only a box, the box. Writes ``out_png`` and returns its path.
    """
    from PIL import Image, ImageDraw, ImageFont

    if load_image is None:
        from clips4.pipeline.images import load_rgb as load_image
    cols = max(1, min(cols, len(hits) or 1))
    rows = max(1, (len(hits) + cols - 1) // cols)
    cap_h, title_h, pad = 30, (28 if title else 0), 6
    W = cols * (thumb + pad) + pad
    Hs = title_h + rows * (thumb + cap_h + pad) + pad
    sheet = Image.new("RGB", (W, Hs), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((pad, 6), title, fill=(0, 0, 0), font=font)
    for n, hit in enumerate(hits):
        img = hit.get("image")
        if img is None:
            img = load_image(str(hit["image_path"]))
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        H, W0 = img.shape[:2]
        mask = hit.get("mask")
        if mask is not None:
            mask = np.asarray(mask).astype(bool)
            if mask.shape != (H, W0):  # nearest resize to the image
                ry = (np.arange(H) * mask.shape[0]) // H
                rx = (np.arange(W0) * mask.shape[1]) // W0
                mask = mask[ry][:, rx]
        bbox = hit.get("bbox")
        if bbox is None and mask is not None and mask.any():
            ys, xs = np.nonzero(mask)
            bbox = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        if bbox is None:
            bbox = (0, 0, H, W0)
        y0, x0, y1, x1 = (int(v) for v in bbox)
        gy, gx = int((y1 - y0) * context), int((x1 - x0) * context)
        cy0, cx0, cy1, cx1 = max(0, y0 - gy), max(0, x0 - gx), min(H, y1 + gy), min(W0, x1 + gx)
        crop = img[cy0:cy1, cx0:cx1].copy()
        if mask is not None:
            crop[_outline(mask[cy0:cy1, cx0:cx1], thickness=max(1, (cy1 - cy0) // 100 + 1))] = color
        pil = Image.fromarray(crop)
        scale = thumb / max(pil.width, pil.height, 1)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BICUBIC)
        if mask is None:  # only a box: draw it on the thumbnail
            d = ImageDraw.Draw(pil)
            d.rectangle([(x0 - cx0) * scale, (y0 - cy0) * scale, (x1 - cx0) * scale - 1, (y1 - cy0) * scale - 1],
                        outline=color, width=2)
        r, c = divmod(n, cols)
        ox = pad + c * (thumb + pad) + (thumb - pil.width) // 2
        oy = title_h + pad + r * (thumb + cap_h + pad) + (thumb - pil.height) // 2
        sheet.paste(pil, (ox, oy))
        tx, ty = pad + c * (thumb + pad), title_h + pad + r * (thumb + cap_h + pad) + thumb + 2
        score = hit.get("score")
        draw.text((tx, ty), f"#{n + 1}  {score:.3f}" if score is not None else f"#{n + 1}", fill=(0, 0, 0), font=font)
        ident = ":".join(str(hit[k]) for k in ("image_id", "segment_id") if hit.get(k) is not None)
        if ident:
            draw.text((tx, ty + 13), ident[:40], fill=(90, 90, 90), font=font)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return str(out_png)


def search_segments(cfg, query: str, *, top: int = 16, templates: bool = False, out: str | Path | None = None) -> list[dict]:
    """The ``top`` cached CLIP segments closest to ``query`` (the clip_features stage of ``cfg``'s dataset), best
    first, as ``{"rank", "score", "image_id", "segment_id", "row_id"}``; with ``out``, also their contact sheet.
    The FAISS index is built once per clip_features output and kept beside it (named by its fingerprint)."""
    from clips4 import data as bundled
    from clips4.pipeline.backends import text_embeddings
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
    text = text_embeddings(backend, [query], bundled.prompt_templates() if templates else ["{}"])[0]
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
            mask = feats.get(r["image_id"], "segment_labels") == r["segment_id"]
            sheet.append({"image_path": feats.row(r["image_id"])["path"], "mask": mask, "bbox": r["bbox"],
                          "score": float(score), "image_id": r["image_id"], "segment_id": r["segment_id"]})
    if out is not None:
        contact_sheet(sheet, str(out), title=query)
    return found
