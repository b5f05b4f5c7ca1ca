"""Consoles for human output. A terminal gets Rich; a file or pipe (cron, cluster logs) gets plain lines that are
never wrapped, cut or coloured, so paths stay whole and greppable, and tables are printed whole at their natural
width (no "cont…" headers)."""
from __future__ import annotations

import logging

from rich.console import Console

#: the width of rules and free text on a plain console; a wider table gets the width it needs
PLAIN_WIDTH = 200


class PlainConsole(Console):
    """A console for files and pipes: a table wider than :data:`PLAIN_WIDTH` is printed at its natural width
    instead of being squeezed (Rich would shorten its headers and cells with an ellipsis)."""

    def print(self, *objects, **kwargs) -> None:  # noqa: A003 - Rich's name
        need = max((self._natural_width(o) for o in objects), default=0)
        if need <= self.width:
            super().print(*objects, **kwargs)
            return
        width = self.width  # Console.print caps its width argument at the console's: widen it for this call
        self.width = need
        try:
            super().print(*objects, **kwargs)
        finally:
            self.width = width

    def _natural_width(self, obj) -> int:
        from rich.measure import Measurement
        from rich.table import Table

        if not isinstance(obj, Table):
            return 0
        return Measurement.get(self, self.options.update(width=1_000_000), obj).maximum


def make_console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    # soft_wrap: printed lines are never wrapped or cut; rules get a wide, fixed width, tables their own
    return PlainConsole(stderr=stderr, width=PLAIN_WIDTH, soft_wrap=True, no_color=True, highlight=False, emoji=False)


class _RayDefaultAuthNotice(logging.Filter):
    """Drops Ray's notice that a local instance it starts uses token authentication by default (Ray >= 2.59).

    clips4's ``--address local`` instance is private to the command and dies with it, so the notice (and its
    advice to opt out) is noise on every run. The notice that token authentication is *disabled*, and every
    other message of that logger, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


#: the logger of Ray's token set-up (ray._private.authentication.authentication_token_setup)
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_default_auth_notice() -> None:
    """Install :class:`_RayDefaultAuthNotice` on Ray's token set-up logger (once; importing Ray is not needed)."""
    lg = logging.getLogger(RAY_AUTH_LOGGER)
    if not any(isinstance(f, _RayDefaultAuthNotice) for f in lg.filters):
        lg.addFilter(_RayDefaultAuthNotice())


# the runner imports this module before it starts Ray: the notice is filtered for every command
quiet_ray_default_auth_notice()


class TolerantStream:
    """A text stream that outlives its reader: once a write or flush fails because the other end went away (a
    closed pipe — ``clips4 … | head -3`` — or a closed terminal), later output is dropped instead of raising, so
    the work goes on and the exit status stays the work's own. Everything else is the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def _failed(self, exc: BaseException) -> bool:
        import errno

        if isinstance(exc, (BrokenPipeError, ConnectionResetError)) or (
                isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.EIO, errno.EBADF)):
            self.broken = True
            return True
        if isinstance(exc, ValueError) and "closed file" in str(exc):
            self.broken = True
            return True
        return False

    def write(self, text):
        if self.broken:
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as exc:
            if self._failed(exc):
                return len(text)
            raise

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self.broken:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            if not self._failed(exc):
                raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tolerate_closed_output() -> tuple:
    """Wrap ``sys.stdout`` and ``sys.stderr`` in :class:`TolerantStream` (once); returns the previous pair."""
    import sys

    saved = (sys.stdout, sys.stderr)
    if sys.stdout is not None and not isinstance(sys.stdout, TolerantStream):
        sys.stdout = TolerantStream(sys.stdout)
    if sys.stderr is not None and not isinstance(sys.stderr, TolerantStream):
        sys.stderr = TolerantStream(sys.stderr)
    return saved
