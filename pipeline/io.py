"""Small file helpers every package shares: whole-file sha256 and output paths that cannot escape their folder."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "safe_join", "UnsafePathError"]

_SHA_CACHE: dict[tuple[str, int, float], str] = {}


class UnsafePathError(ValueError):
    """An id or name from a dataset file would put an output outside its folder."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file or fsspec URL, read in 4 MiB chunks. Local files are memoised by (path, size,
    mtime): a weight file is hashed once per process."""
    path = str(path)
    key = None
    if "://" not in path or path.startswith("file://"):
        p = Path(path.removeprefix("file://"))
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime)
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
        opener = lambda: open(p, "rb")  # noqa: E731
    else:
        import fsspec

        opener = lambda: fsspec.open(path, "rb").open()  # noqa: E731
    h = hashlib.sha256()
    with opener() as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if key is not None:
        _SHA_CACHE[key] = h.hexdigest()
    return h.hexdigest()


def safe_join(base: str | os.PathLike, *parts: str) -> Path:
    """``base / part / ...`` where each part comes from data (image ids, sequence names): absolute parts, ``..``
    and empty parts are refused, and the result must stay inside ``base`` (symlinks resolved)."""
    base_p = Path(base)
    for part in parts:
        s = str(part)
        pieces = s.replace("\\", "/").split("/")
        if not s or os.path.isabs(s) or s.startswith(("/", "\\")) or ".." in pieces or "" in pieces or "\x00" in s:
            raise UnsafePathError(f"refusing output path component {s!r}: ids and names must be relative, without "
                                  f"'..' or empty parts (output folder {base_p})")
    out = base_p.joinpath(*parts)
    root = base_p.resolve()
    if not (out.resolve() == root or root in out.resolve().parents):
        raise UnsafePathError(f"{out} would be written outside its output folder {root}")
    return out
