"""Rendering of one segmentation prediction (for ``clips4 predict``): label PNG, overlay with legend, areas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clips4.evaluate.palette import colorize, save_indexed_png, voc_palette
from clips4.pipeline.safepath import output_path

__all__ = ["render_prediction", "class_areas", "overlay", "LEGEND_WIDTH"]

LEGEND_WIDTH = 220


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


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray | None = None, alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """Blend label colours over the image (ignored pixels keep the image)."""
    image = np.asarray(image, dtype=np.uint8)
    labels = np.asarray(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} sizes differ")
    col = colorize(labels, palette).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + col * alpha
    out[labels == ignore_index] = image[labels == ignore_index]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


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
) -> dict:
    """Write ``<stem>_labels.png`` (palette PNG, pixel values = class ids), ``<stem>_overlay.png`` (image blended
    with class colours plus a legend panel of width :data:`LEGEND_WIDTH` on the right listing the classes present
    with their colours and area fractions) and ``<stem>_areas.json``. Returns the paths and the areas."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    labels = np.asarray(labels).astype(np.int64)
    image = np.asarray(image, dtype=np.uint8)
    label_path = save_indexed_png(output_path(out_dir, f"{stem}_labels.png"), labels, pal)
    areas = class_areas(labels, class_names, ignore_index)
    entries = [(name, tuple(pal[a["id"] % len(pal)].tolist()), a["fraction"]) for name, a in areas.items()
               if a["id"] != ignore_index]
    ov = Image.fromarray(overlay(image, labels, pal, alpha, ignore_index))
    legend = _legend(ov.height, entries)
    canvas = Image.new("RGB", (ov.width + legend.width, max(ov.height, legend.height)), (255, 255, 255))
    canvas.paste(ov, (0, 0))
    canvas.paste(legend, (ov.width, 0))
    overlay_path = output_path(out_dir, f"{stem}_overlay.png")
    canvas.save(overlay_path)
    areas_path = output_path(out_dir, f"{stem}_areas.json")
    areas_path.write_text(json.dumps({"image_size": list(labels.shape), "classes": areas}, indent=2))
    return {"labels": label_path, "overlay": overlay_path, "areas_json": areas_path, "areas": areas,
            "legend_colors": {name: list(c) for name, c, _ in entries}}
