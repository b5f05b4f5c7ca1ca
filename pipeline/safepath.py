"""Names read from dataset files end up in file paths: check them before joining, and check where writes land.

Image ids and sequence names come from split files (``ImageSets/…/val.txt``) that clips4 does not control. Joined
unchecked, a line ``/abs/seq`` or ``../../x`` turns ``out / name`` into a path outside the output folder (pathlib
drops ``out`` for an absolute right-hand side), so an evaluation could overwrite ground truth or write anywhere.

- :func:`check_name` validates one id/name (no absolute path, no ``..``, no separators unless sub-folders are
  allowed, no control characters) and names the file and line it came from.
- :func:`output_path` is what every writer of per-item outputs calls: it joins and verifies that the result
  (symlinks resolved) stays under the output folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

__all__ = ["UnsafePathError", "check_name", "output_path"]

# a Windows drive ("C:") or UNC prefix makes a name absolute on that platform
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafePathError(ValueError):
    """An id or name would escape the folder it is joined to."""


def _problem(name: str, allow_subdirs: bool) -> str | None:
    if not name:
        return "it is empty"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "it contains a control character"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "it is an absolute path"
    if "\\" in name:
        return "it contains a backslash"
    parts = name.split("/")
    if ".." in parts:
        return "it contains '..'"
    if "/" in name:
        if not allow_subdirs:
            return "it contains '/' (a plain name is expected here)"
        if any(p in ("", ".") for p in parts):
            return "it has an empty or '.' path component"
    elif name == ".":
        return "it is '.'"
    return None


def check_name(name: str, *, what: str = "image id", source: str | None = None, line: int | None = None,
               allow_subdirs: bool = False) -> str:
    """Return ``name`` when it is safe to join under a folder; raise :class:`UnsafePathError` otherwise.

    ``source``/``line`` say where the name was read (a split file and its 1-based line number).
    ``allow_subdirs`` accepts relative ``a/b`` names (folder datasets have nested ids), still without ``..``."""
    why = _problem(str(name), allow_subdirs)
    if why is None:
        return name
    where = f"{source}" + (f" line {line}" if line is not None else "") + ": " if source else ""
    raise UnsafePathError(f"{where}unsafe {what} {name!r}: {why}")


def output_path(base: str | os.PathLike, *parts: str, what: str = "output") -> Path:
    """``base / parts…`` after checking that it stays under ``base`` (``..``, absolute parts and symlinks that
    point elsewhere are refused with :class:`UnsafePathError`). ``base`` need not exist yet."""
    base = Path(base)
    path = base.joinpath(*parts)
    for p in parts:  # refuse the obvious cases by name, before touching the file system
        pp = PurePosixPath(str(p).replace("\\", "/"))
        if pp.is_absolute() or _DRIVE.match(str(p)) or ".." in pp.parts:
            raise UnsafePathError(f"{what} path {str(p)!r} would leave the output folder {base}")
    real_base = os.path.realpath(base)
    real = os.path.realpath(path)
    if os.path.commonpath([real_base, real]) != real_base or real == real_base:
        raise UnsafePathError(f"{what} path {path} resolves to {real}, outside the output folder {base}")
    return path
