"""Consoles for human output. A terminal gets Rich; a file or pipe (cron, cluster logs) gets plain lines that are
never wrapped, cut or coloured, so paths stay whole and greppable."""
from __future__ import annotations

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    # soft_wrap: printed lines are never wrapped or cut; tables and rules get a wide, fixed width
    return Console(stderr=stderr, width=200, soft_wrap=True, no_color=True, highlight=False, emoji=False)
