"""Image ids and paths as file systems give them, stored losslessly, and shown safely in logs.

POSIX file names are bytes. Python lists a name that is not valid UTF-8 as a ``str`` with lone surrogates
(``b"caf\\xe9.jpg"`` → ``"caf\\udce9.jpg"``, PEP 383), which opens the file again but cannot be written to
Parquet (Arrow strings are UTF-8). Such a value is stored as ``"\\0"`` + its bytes percent-encoded
(``"\\0caf%E9.jpg"``): a name can never contain NUL (neither can an id read from a split file, which refuses control
characters), so the stored form is unambiguous and :func:`from_stored` gives back the very same ``str``. Every
other value is stored as it is, so existing caches and ids are unchanged.

:func:`display` is the form for logs and messages: undecodable bytes as ``\\xNN``, control characters (a newline
in a file name) as escapes, so that one item is always one line.
"""
from __future__ import annotations

from urllib.parse import quote_from_bytes, unquote_to_bytes

__all__ = ["to_stored", "from_stored", "display", "safe_text"]

_MARK = "\0"
#: characters left as they are in the percent-encoded form (readable); "%" itself is always encoded
_SAFE = "/ !#$&'()*+,-.:;=?@[]^_`{|}~"


def _needs_escape(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return s.startswith(_MARK)


def to_stored(s):
    """The form of id/path ``s`` that a Parquet string column can hold (``s`` itself when it is valid UTF-8)."""
    if not isinstance(s, str) or not _needs_escape(s):
        return s
    return _MARK + quote_from_bytes(s.encode("utf-8", "surrogateescape"), safe=_SAFE)


def from_stored(s):
    """Inverse of :func:`to_stored`: the ``str`` that opens the file again (with PEP 383 surrogates)."""
    if not isinstance(s, str) or not s.startswith(_MARK):
        return s
    return unquote_to_bytes(s[len(_MARK):]).decode("utf-8", "surrogateescape")


_CONTROL = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display(s) -> str:
    """``s`` (a stored or live id, path or message) as one printable line: undecodable bytes as ``\\xNN``,
    control characters escaped."""
    s = from_stored(str(s))
    s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in s):
        return s
    return "".join(_CONTROL.get(c, f"\\x{ord(c):02x}") if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 else c for c in s)


def safe_text(s):
    """A message that may quote a file name, made storable as UTF-8 (undecodable bytes as ``\\xNN``)."""
    if not isinstance(s, str):
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
