"""Per-item limits of the stages: checked from the image header before decoding, plus a per-item time limit.

A 3x10000 strip resized to a 448 short side becomes 448x1,493,333 (a 14x46667 ViT grid); a 108-megapixel photo
takes several GB in the segments stage. Such items fail with a reason that names the limit, before they are
decoded, and an item that still runs too long is stopped so that the rest of its batch goes on.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from clips4.pipeline.images import ImageError, image_size

__all__ = ["ItemTimeout", "check_image_size", "header_hw", "resized_size", "time_limit"]


class ItemTimeout(ImageError):
    """An item ran longer than its stage's ``item_timeout_s``."""


def header_hw(record) -> tuple[int, int]:
    """(height, width) of a record's image from the dataset listing or its header; (-1, -1) if unreadable
    (the decoder then reports the real reason)."""
    h, w = getattr(record, "height", -1), getattr(record, "width", -1)
    if h > 0 and w > 0:
        return h, w
    return image_size(record.path)


def resized_size(h: int, w: int, short_side: int | None, window: int | None) -> tuple[int, int]:
    """Input size of the CLIP dense-feature protocol: short side to ``short_side``, never below ``window``
    (aspect kept). Approximate to a patch: for limits, not for the model."""
    s = short_side / min(h, w) if short_side else 1.0
    if window:
        s = max(s, window / min(h, w))
    return int(round(h * s)), int(round(w * s))


def check_image_size(path: str, h: int, w: int, *, max_pixels: int | None = None,
                     max_aspect_ratio: float | None = None, resized: tuple[int, int] | None = None,
                     max_resized_side: int | None = None, stage: str = "") -> None:
    """Raise :class:`ImageError` naming ``path`` and the limit when the header size breaks one (None: no limit).
    Unknown sizes (``h`` or ``w`` < 1) pass: decoding reports them."""
    if h < 1 or w < 1:
        return
    where = f"{stage}." if stage else ""
    if max_pixels is not None and h * w > max_pixels:
        raise ImageError(f"{path}: image is {w}x{h} = {w * h / 1e6:.1f} MP, above {where}max_pixels="
                         f"{max_pixels / 1e6:.1f} MP; downscale it or raise the limit")
    if max_aspect_ratio is not None and max(h, w) / min(h, w) > max_aspect_ratio:
        raise ImageError(f"{path}: image is {w}x{h}, aspect ratio {max(h, w) / min(h, w):.1f}:1 is above "
                         f"{where}max_aspect_ratio={max_aspect_ratio:g}")
    if resized is not None and max_resized_side is not None and max(resized) > max_resized_side:
        raise ImageError(f"{path}: image is {w}x{h} and would be resized to {resized[1]}x{resized[0]}, longest "
                         f"side above {where}max_resized_side={max_resized_side}")


@contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`ItemTimeout` in the block after ``seconds`` of wall time (None or 0: no limit).

    Uses ``SIGALRM``, so it interrupts Python code between bytecodes (a single long C call finishes first) and
    only works in the main thread (Ray actors and the local executor run items there); elsewhere it is a no-op.
    Unwinding frees the item's memory, unlike abandoning a thread."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise ItemTimeout(f"{what}: took longer than item_timeout_s={seconds:g} s; stopped so the rest of its "
                          "batch can run")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
