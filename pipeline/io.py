"""The one whole-file sha256 helper (local files and fsspec URLs)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256"]

_SHA_CACHE: dict[tuple[str, int, float], str] = {}


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
