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
