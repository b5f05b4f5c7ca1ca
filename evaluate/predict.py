"""Rendering of one segmentation prediction (for ``clips4 predict``): label PNG, overlay with legend, areas."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clips4.evaluate.compat import check_width, source_width
from clips4.evaluate.palette import figure_palette, overlay, save_indexed_png
from clips4.evaluate.sources import checkpoint_source, source_text_embeddings, text_embeddings_for
from clips4.pipeline.config import Config
from clips4.pipeline.images import load_rgb
from clips4.pipeline.safepath import output_path

__all__ = ["render_prediction", "class_areas", "LEGEND_WIDTH", "Segmenter", "Prediction", "predict_images",
           "PREDICT_PALETTE"]

LEGEND_WIDTH = 220
#: height of the title line above the overlay (the image's name)
TITLE_HEIGHT = 26


def class_areas(labels: np.ndarray, class_names: Sequence[str], ignore_index: int = 255) -> dict:
    """``{name: {"id", "pixels", "fraction"}}`` for the classes present, sorted by area (largest first).
    Fractions are over all pixels; ignore / unknown ids are reported under ``"<ignore>"`` / ``"id_<n>"``."""
    labels = np.asarray(labels).astype(np.int64)
    total = labels.size
    ids, counts = np.unique(labels, return_counts=True)
    out = {}
    for i, c in sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1]):
        if i == ignore_index:
            name = "<ignore>"
        elif 0 <= i < len(class_names):
            name = class_names[i]
        else:
            name = f"id_{i}"
        out[name] = {"id": int(i), "pixels": int(c), "fraction": float(c / total) if total else 0.0}
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _legend(height: int, entries: list[tuple[str, tuple[int, int, int], float]]) -> Image.Image:
    row = 22
    panel = Image.new("RGB", (LEGEND_WIDTH, max(height, row * len(entries) + 10)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = _font(13)
    for n, (name, colour, frac) in enumerate(entries):
        y = 6 + n * row
        draw.rectangle([8, y, 26, y + 16], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((34, y + 1), f"{name} ({100 * frac:.1f}%)", fill=(0, 0, 0), font=font)
    return panel


def render_prediction(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    stem: str,
    *,
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    ignore_index: int = 255,
    title: str | None = None,
) -> dict:
    """Write ``<stem>_labels.png`` (palette PNG, pixel values = class ids), ``<stem>_overlay.png`` (image blended
    with class colours under a title line naming the image (``title``, default ``stem``), plus a legend panel of
    width :data:`LEGEND_WIDTH` on the right listing the classes present, largest first, with their colours and
    area fractions) and ``<stem>_areas.json``. Returns the paths and the areas."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pal = figure_palette() if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    labels = np.asarray(labels).astype(np.int64)
    image = np.asarray(image, dtype=np.uint8)
    label_path = save_indexed_png(output_path(out_dir, f"{stem}_labels.png"), labels, pal)
    areas = class_areas(labels, class_names, ignore_index)
    entries = [(name, tuple(pal[a["id"] % len(pal)].tolist()), a["fraction"]) for name, a in areas.items()
               if a["id"] != ignore_index and a["pixels"] > 0]
    ov = Image.fromarray(overlay(image, labels, pal, alpha, ignore_index))
    legend = _legend(ov.height, entries)
    top = TITLE_HEIGHT
    canvas = Image.new("RGB", (ov.width + legend.width, top + max(ov.height, legend.height)), (255, 255, 255))
    ImageDraw.Draw(canvas).text((8, 5), str(title if title is not None else stem), fill=(0, 0, 0), font=_font(14))
    canvas.paste(ov, (0, top))
    canvas.paste(legend, (ov.width, top))
    overlay_path = output_path(out_dir, f"{stem}_overlay.png")
    canvas.save(overlay_path)
    areas_path = output_path(out_dir, f"{stem}_areas.json")
    areas_path.write_text(json.dumps({"image_size": list(labels.shape), "classes": areas}, indent=2))
    return {"labels": label_path, "overlay": overlay_path, "areas_json": areas_path, "areas": areas,
            "legend_colors": {name: list(c) for name, c, _ in entries}}


#: free-form classes have no background: every class gets a colour of the figures' palette (none black, none
#: near another; clips4.evaluate.palette.DISTINCT_COLOURS)
PREDICT_PALETTE = figure_palette(ignore_index=None)


@dataclass
class Prediction:
    """One image segmented with free-form class names."""

    #: ``(H, W) int64`` index into :attr:`classes` of each pixel
    labels: np.ndarray
    #: ``(K, H, W) float32`` cosine similarity of each pixel's embedding to each class's text embedding (plus a
    #: checkpoint's class calibration bias when the classes are the ones it was calibrated on)
    scores: np.ndarray
    classes: list[str]


class Segmenter:
    """Segment images with any class names, in memory (for notebooks and ``clips4 predict``).

    >>> from clips4 import Segmenter
    >>> pred = Segmenter("runs/train").predict("photo.jpg", ["sky", "tree", "moon"])
    >>> pred.labels.shape, pred.scores.shape

    ``model``: a trained run — its folder (``runs/NAME``), its name, or a checkpoint file (``final.pt``) — or
    ``"teacher"`` (the configured CLIP backend's dense features). A run is self-sufficient: the class texts it was
    trained on are stored in it, and other class names are embedded by the CLIP it was trained against.
    ``config``: a :class:`~clips4.pipeline.config.Config`, a YAML file, or None (the nearest ``stages.yaml`` and
    ``clips4.yaml``, else defaults); for a run it only supplies this machine's settings (device, weight cache).
    """

    def __init__(self, model: str | Path = "teacher", *, config: Config | str | Path | None = None,
                 device: str = "auto", calibrated: bool = True):
        from clips4.pipeline.config import load_config

        self.cfg = config if isinstance(config, Config) else load_config(None, [config] if config else None, [])
        self.model = str(model)
        self._text: dict[tuple[str, ...], np.ndarray] = {}
        self.width: int | None = None  # the model's embedding width where it declares one (a checkpoint)
        #: a checkpoint's class calibration (clips4.trainer.calibration), applied to the classes it was fitted on
        self.calibration: dict | None = None
        self.source = None
        if self.model == "teacher":
            from clips4.pipeline.processors import build_backend

            backend = build_backend(self.cfg.params("clip_features").clip)  # type: ignore[attr-defined]
            self._embed = lambda img: np.asarray(backend.dense_features([img])[0], np.float32)
            self.name = f"teacher ({backend.info().get('name', 'CLIP')})"
        else:
            src = checkpoint_source(self.model, device, self.cfg.runs_root)
            self.source = src
            self._embed, self.name, self.width = src.embed_image, src.name, source_width(src)
            self.calibration = src.calibration if calibrated else None

    def embed(self, image: np.ndarray | str | Path) -> np.ndarray:
        """``(h, w, D) float32`` L2-normalised pixel embeddings of an ``(H, W, 3) uint8`` image or an image file."""
        return self._embed(load_rgb(str(image)) if isinstance(image, (str, Path)) else np.asarray(image))

    def text_embeddings(self, classes: Sequence[str]) -> np.ndarray:
        """``(K, D) float32`` class text embeddings (the 85 prompt templates), cached per class list."""
        key = tuple(classes)
        if key not in self._text:
            text = (source_text_embeddings(self.cfg, self.source, list(classes))[0] if self.source is not None
                    else text_embeddings_for(self.cfg, list(classes))[0])
            check_width(self.width, text.shape[-1], source=self.model,
                        against="the text embeddings of the configured CLIP backend")
            self._text[key] = text
        return self._text[key]

    def predict(self, image: np.ndarray | str | Path, classes: Sequence[str]) -> Prediction:
        """Every pixel of ``image`` takes the class whose text embedding is closest to its embedding."""
        import torch

        from clips4.trainer.inference import similarity_logits

        img = load_rgb(str(image)) if isinstance(image, (str, Path)) else np.asarray(image)
        if not classes:
            raise ValueError("predict needs at least one class name")
        from clips4.trainer.calibration import stored_bias

        text = self.text_embeddings(classes)
        with torch.no_grad():
            scores = similarity_logits(self.embed(img), text, img.shape[:2], layout="hwd")
        scores = scores.cpu().numpy().astype(np.float32)
        bias = stored_bias(self.calibration, list(classes), text)[0] if self.calibration else None
        if bias is not None:  # the classes the checkpoint was calibrated on: its calibrated scores
            scores = scores + bias[:, None, None]
        return Prediction(scores.argmax(0).astype(np.int64), scores, list(classes))


def predict_images(cfg: Config, images: Sequence[str | Path], classes: list[str], out: Path, *,
                   model: str = "teacher", device: str = "auto", alpha: float = 0.5,
                   on_result: Callable[[str, dict | None, str | None], None] | None = None) -> dict:
    """Label PNG, overlay with legend and class areas (JSON) for each image; returns ``{"written", "failed"}``.

    ``model="teacher"`` runs the configured CLIP backend's ``dense_features`` on the image itself (images need
    not be in any cache); a checkpoint path runs the trained network. An image that cannot be read or embedded
    is reported in ``failed`` (with the reason naming it); the others are still written."""
    seg = Segmenter(model, config=cfg, device=device)
    seg.text_embeddings(classes)  # a text-encoder problem fails the command, not each image
    name = seg.name
    out = Path(out)
    written, failed = {}, {}
    stems: dict[str, int] = {}
    for path in images:
        path = str(path)
        stem = Path(path).stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # two inputs with the same name must not overwrite each other
            stem = f"{stem}_{stems[stem]}"
        try:
            img = load_rgb(path)
            labels = seg.predict(img, classes).labels
            r = render_prediction(img, labels, classes, out, stem, alpha=alpha, palette=PREDICT_PALETTE,
                                  title=Path(path).name)
            doc = json.loads(Path(r["areas_json"]).read_text())
            doc.update({"image": path, "model": name, "queried_classes": list(classes)})
            Path(r["areas_json"]).write_text(json.dumps(doc, indent=2))
            written[path] = {k: str(r[k]) for k in ("labels", "overlay", "areas_json")} | {"areas": r["areas"]}
            if on_result:
                on_result(path, written[path], None)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
            msg = str(exc) if path in str(exc) else f"{path}: {exc}"
            failed[path] = msg
            if on_result:
                on_result(path, None, msg)
    return {"written": written, "failed": failed, "model": name, "classes": list(classes)}
