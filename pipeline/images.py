"""Robust image loading: every odd file becomes either an RGB uint8 array or an ``ImageError`` naming it.

Modes handled: RGB, L, LA, P (palette, with or without transparency), RGBA (composited on white, since
segmentation sees what a viewer sees), CMYK and YCbCr (converted), 16-bit and 32-bit integer / float
greyscale (rescaled to 8 bits by the file's bit depth, not its min/max, so dark images stay dark).
Truncated or corrupt files fail: Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off on purpose, because a
half-decoded image would be cached as if it were real.
"""
from __future__ import annotations

import io
import warnings

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

#: Default upper bound on pixels per image. 12000x9000 (108 MP) fits; a decompression bomb does not.
DEFAULT_MAX_PIXELS = 200_000_000


class ImageError(ValueError):
    """An image could not be used; the message names the file and the reason."""


def _to_rgb(img: Image.Image, path: str) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype.itemsize > 1:
            bits = 16 if mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 32
            arr = (arr.astype(np.float64) / (2**bits - 1) * 255.0).round().clip(0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        # Float images are conventionally in [0, 1]; anything else is rescaled by its range.
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if not (0.0 <= lo and hi <= 1.0):
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = np.nan_to_num(arr * 255.0).round().clip(0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "1":
        img = img.convert("L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageError(f"{path}: cannot convert image mode {mode!r} to RGB ({exc})") from exc


def open_image(path: str) -> Image.Image:
    """Open ``path`` (local path or fsspec URL) with Pillow, raising ``ImageError`` on any failure."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: file not found") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{path}: is a directory, not an image") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc})") from exc
    if not data:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            # between Pillow's warning and error thresholds our max_pixels decides (checked from the header)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Pillow's own guard stays on for every reader in the process; it refuses what no limit here allows
        raise ImageError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image file Pillow can identify") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt image header ({exc})") from exc
    return img


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the header only; ``(-1, -1)`` when the file cannot be read (recorded later)."""
    try:
        with fsspec.open(path, "rb") as f, warnings.catch_warnings():
            # a large header is the limits' business (clips4.pipeline.limits), not a warning on stderr
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(f)
            w, h = img.size
        return h, w
    except Exception:  # noqa: BLE001 - the load step reports the real reason per image
        return -1, -1


def load_rgb(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to ``(H, W, 3) uint8`` RGB.

    Raises ``ImageError`` (message names the file) for missing, empty, non-image, corrupt or truncated
    files, and for images above ``max_pixels`` (checked from the header, before decoding).
    """
    img = open_image(path)
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{path}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"{path}: image is {w}x{h} = {w * h / 1e6:.1f} MP, above max_pixels={max_pixels / 1e6:.1f} MP; "
            "downscale it or raise the limit (--set segments.max_pixels=...)"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        # "image file is truncated", "broken data stream", bad Huffman tables, ...
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from exc
    # EXIF orientation is ignored on purpose: dataset masks (VOC, COCO) are aligned with the stored pixels.
    arr = _to_rgb(img, path)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{path}: decoded to unexpected shape {arr.shape}")
    # a writable, contiguous copy: torch.from_numpy and in-place edits need one; PIL's buffer is read-only
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, order="C")


def load_label_png(path: str) -> np.ndarray:
    """A label / mask PNG as ``(H, W) int64`` ids (palette indices for 'P' images, values otherwise)."""
    img = open_image(path)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated label image ({exc})") from exc
    if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.int64)
    if img.mode == "1":
        return np.asarray(img.convert("L")).astype(np.int64)
    raise ImageError(f"{path}: label image has mode {img.mode!r}; expected a palette or single-channel PNG")
