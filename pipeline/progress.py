"""Progress of a fan-out: a Rich bar on a terminal, plain flushed lines everywhere else (cron, CI, ``> log``).

Plain lines come at a steady pace: one every ``every_items`` finished items (default: every 5 % of the run) or
every ``every_s`` seconds, whichever comes first, each with counts, rate, elapsed time and ETA, e.g.::

    2025-01-31T02:00:14 segments: 120/2400 (5.0%) failed 0, 3.2 img/s, elapsed 0:00:37, ETA 0:11:52
"""
from __future__ import annotations

import math
import sys
import time
from datetime import timedelta

from rich.console import Console

from clips4.pipeline.console import make_console


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0, seconds))))


class PlainProgress:
    def __init__(self, description: str, total: int, every_s: float = 30.0, every_items: int | None = None,
                 stream=None):
        self.description, self.total = description, total
        self.every_s = every_s
        self.every_items = every_items or max(1, math.ceil(total / 20))
        self.stream = stream
        self.t0 = time.perf_counter()
        self.done = self.failed = 0
        self._last_t, self._last_n = self.t0, 0

    def __enter__(self) -> "PlainProgress":
        self._line()
        return self

    def __exit__(self, *exc) -> None:
        if self.done != self._last_n:
            self._line()

    def update(self, done: int, failed: int) -> None:
        self.done, self.failed = done, failed
        self.tick()

    def tick(self) -> None:
        """Log if a step's worth of items or seconds passed since the last line (call it from wait loops)."""
        now = time.perf_counter()
        if self.done - self._last_n >= self.every_items or now - self._last_t >= self.every_s or self.done == self.total:
            if self.done != self._last_n or now - self._last_t >= self.every_s:
                self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        el = now - self.t0
        rate = self.done / el if el > 0 else 0.0
        eta = _hms((self.total - self.done) / rate) if rate > 0 else "-"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        stream = self.stream or sys.stderr
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.description}: {self.done}/{self.total} ({pct:.1f}%) "
              f"failed {self.failed}, {rate:.2f} img/s, elapsed {_hms(el)}, ETA {eta}", file=stream, flush=True)
        self._last_t, self._last_n = now, self.done


class RichProgress:
    def __init__(self, description: str, total: int, console: Console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.t0 = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TextColumn("failed {task.fields[failed]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = self.progress.add_task(description, total=total, rate="-", failed=0)

    def __enter__(self) -> "RichProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, done: int, failed: int) -> None:
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        self.progress.update(self.task, completed=done, rate=f"{rate:.2f}", failed=failed)

    def tick(self) -> None:
        pass


class NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, done: int, failed: int) -> None:
        pass

    def tick(self) -> None:
        pass


def make_progress(description: str, total: int, show: bool, every_s: float = 30.0):
    """Rich bar when stderr is a terminal, plain lines when it is not, nothing when ``show`` is False."""
    if not show:
        return NoProgress()
    console = make_console(stderr=True)
    if console.is_terminal:
        return RichProgress(description, total, console)
    return PlainProgress(description, total, every_s=every_s)
