"""Whose fault is an error: the item's (recorded as that image's failure) or the infrastructure's (retried).

An image that cannot be decoded, is too large or trips a processor bug on its content is the item's failure: it
is stored with a plain-text reason and not retried until its file changes (or ``--retry-failed``). A dead worker,
an OOM kill, a full disk or a lost node says nothing about the images of the batch: those are retried with
backoff and, if they keep failing, fail the run, so the images stay unprocessed for the next run.
"""
from __future__ import annotations

import errno
import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

#: errno values that describe the machine, not the image
INFRA_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE,
    getattr(errno, "ESTALE", -1), errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE,
}
#: the same, as they appear in messages that lost their errno (strings from other processes, Ray wrappers)
INFRA_PATTERNS = (
    "No space left on device", "Disk quota exceeded", "Cannot allocate memory", "Read-only file system",
    "Too many open files", "Input/output error", "Stale file handle", "out of memory", "OutOfMemory",
)
#: Ray's exception names that mean a worker, node or object was lost (matched by name: ray is optional here)
RAY_INFRA = {
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "WorkerCrashedError",
    "NodeDiedError", "OutOfMemoryError", "OutOfDiskError", "ObjectLostError", "OwnerDiedError",
    "ObjectReconstructionFailedError", "ObjectStoreFullError", "RaySystemError", "LocalRayletDiedError",
    "ObjectFetchTimedOutError", "ReferenceCountingAssertionError", "TaskUnschedulableError", "GetTimeoutError",
}


class InfraError(RuntimeError):
    """A batch failed for a reason outside its images (worker died, disk full, …): retried, never recorded."""


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def root_cause(exc: BaseException) -> BaseException:
    """The original exception under Ray's ``RayTaskError`` wrappers (``.cause``) and ``raise … from`` chains."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        if isinstance(inner, BaseException) and type(exc).__name__.startswith("RayTaskError"):
            exc = inner
            continue
        if isinstance(exc, InfraError) and exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    return exc


def is_infra_message(text: str) -> bool:
    return any(p.lower() in text.lower() for p in INFRA_PATTERNS)


def is_infra(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is about the machine, not the item."""
    if isinstance(exc, InfraError):
        return True
    for e in (exc, root_cause(exc)):
        if isinstance(e, MemoryError):
            return True
        if isinstance(e, OSError) and e.errno in INFRA_ERRNOS:
            return True
        if any(c.__name__ in RAY_INFRA for c in type(e).__mro__):
            return True
    return is_infra_message(plain_reason(exc))


def plain_reason(exc: BaseException, limit: int = 500) -> str:
    """One line of plain text naming the root cause: ``OSError: [Errno 28] No space left on device: '/x'``.

    No ANSI colour codes, no Ray traceback wrapper, whitespace collapsed, at most ``limit`` characters.
    """
    cause = root_cause(exc)
    text = strip_ansi(str(cause))
    if type(cause).__name__.startswith("RayTaskError") or "Traceback (most recent call last)" in text:
        # an undeserialisable cause: Ray's text is a traceback; its last non-empty line is the error itself
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = lines[-1] if lines else text
    text = " ".join(text.split())
    name = type(cause).__name__
    msg = text if text.startswith(name) else f"{name}: {text}" if text else name
    return msg[:limit]


def plain_message(text: str, limit: int = 500) -> str:
    """An item's failure text made plain: no colour codes, one line."""
    return " ".join(strip_ansi(text).split())[:limit]


class StageInterrupted(RuntimeError):
    """SIGINT/SIGTERM during a stage: finished parts stay (a rerun reuses them); exit status 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class _Signalled(BaseException):
    """Raised by the handler so that no ``except Exception`` on the way swallows the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class signals_as_exceptions:
    """Within the block, SIGTERM and SIGINT raise :class:`_Signalled` in the main thread (elsewhere: no-op)."""

    def __enter__(self):
        import signal
        import threading

        self.old = {}
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise _Signalled(signum)

            for s in (signal.SIGTERM, signal.SIGINT):
                self.old[s] = signal.signal(s, handler)
        return self

    def __exit__(self, *exc):
        import signal

        for s, h in self.old.items():
            signal.signal(s, h)
        return False
