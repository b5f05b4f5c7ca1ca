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

__all__ = ["ItemTimeout", "available_memory", "check_image_size", "check_memory", "default_budget", "header_hw",
           "resized_size", "time_limit", "working_set"]

_GiB = 1 << 30
#: peak bytes per image pixel of one item, measured by benchmarks/memory.py (segments: the learned detector at 3
#: scales, OWT-UCM and labels, 0.79 GiB at 1 MP and 3.21 GiB at 4 MP; clip-features: the decode and the resize to
#: the model's input, 0.08 GiB at 4 MP), with some margin, plus a fixed part
BYTES_PER_PIXEL = {"segments": 880, "clip_features": 24}
FIXED_BYTES = {"segments": 64 << 20, "clip_features": 128 << 20}
#: share of the available memory that the default budget hands out (the rest: the process itself, the page cache)
BUDGET_SHARE = 0.8


def working_set(stage: str, h: int, w: int) -> int:
    """Estimated peak bytes of one ``h`` x ``w`` item in ``stage`` (``segments``, ``clip_features``; 0 if unknown)."""
    if h < 1 or w < 1 or stage not in BYTES_PER_PIXEL:
        return 0
    return int(h) * int(w) * BYTES_PER_PIXEL[stage] + FIXED_BYTES[stage]


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> tuple[int | None, int | None]:
    """(memory the machine can still give: ``MemAvailable`` or what the cgroup's limit leaves, whichever is less;
    address space this process may still map under ``ulimit -v``). None where there is no such figure."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, used = _read_int(limit), _read_int(usage)
        if lim is not None and used is not None and lim < (1 << 60):
            host = min(host if host is not None else lim, max(0, lim - used))
            break
    space = None
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            space = max(0, soft - (_status_kib("VmSize") or 0))
    except (ImportError, ValueError, OSError):
        pass
    return host, space


def default_budget(num_workers: int = 1) -> int:
    """The per-item budget when none is configured: ``BUDGET_SHARE`` of the available memory shared by the
    ``num_workers`` workers of a node, and of the address space left to this process under ``ulimit -v``."""
    host, space = available_memory()
    cands = []
    if host is not None:
        cands.append(BUDGET_SHARE * host / max(1, int(num_workers)))
    if space is not None:
        cands.append(BUDGET_SHARE * space)
    return int(min(cands)) if cands else 1 << 62


def item_budget(ctx: dict | None) -> int:
    """Bytes one item may take in this worker: ``ctx["memory_budget_mb"]`` (``ray.memory_budget_mb``) when set,
    else :func:`default_budget` for ``ctx["num_workers"]`` workers. Computed once per worker, after its model."""
    ctx = ctx or {}
    mb = ctx.get("memory_budget_mb")
    return int(mb) << 20 if mb else default_budget(int(ctx.get("num_workers") or 1))


def check_memory(path: str, h: int, w: int, stage: str, budget: int | None) -> None:
    """Raise :class:`ImageError` naming ``path``, its estimated working set and the budget when the item does not
    fit (checked from the header, before decoding). Unknown sizes pass: decoding reports them."""
    need = working_set(stage, h, w)
    if not budget or not need or need <= budget:
        return
    raise ImageError(f"{path}: image is {w}x{h} = {w * h / 1e6:.1f} MP; the {stage} stage needs about "
                     f"{need / _GiB:.1f} GiB for it ({BYTES_PER_PIXEL[stage]} bytes per pixel), above the memory "
                     f"budget of {budget / _GiB:.1f} GiB per item (ray.memory_budget_mb; default: "
                     f"{BUDGET_SHARE:.0%} of the available memory shared by the workers); downscale it, or raise "
                     "the budget where the machine has the memory (then --retry-failed)")


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
