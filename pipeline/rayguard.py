"""Every process of a private Ray instance ends with the driver that started it, however the driver ends.

Ray ties the head's raylet and GCS to the driver (they get SIGKILL when it dies), but not the raylet's helpers: the
dashboard agent and the runtime-env agent, orphaned and renamed ``ray::DashboardAgent`` / ``ray::RuntimeEnvAgent``,
keep running for a minute or more after a killed driver (they try to report the dead raylet to the dead GCS) and
ignore SIGTERM meanwhile.

:func:`start` launches a small guard process (its own session, so a Ctrl-C or a signal to the driver's process group
does not reach it) that blocks on a pipe from the driver. The pipe closes when the driver ends (exit, exception,
SIGKILL, OOM kill); the guard then stops every process of this user that still writes a file in the instance's
session directory (``<temp dir>/session_<time>_<pid>``, unique to this instance): every Ray process keeps its log
files there open, renamed or not, while a reader such as ``tail -f`` on a log does not count. Nothing else is
touched: a cluster started with ``ray start`` has its own session directory, and a driver that joins one (or whose
``ray.init`` found one running) starts no guard.

Linux only (it reads /proc); elsewhere :func:`start` does nothing. Run as ``python rayguard.py SESSION_DIR``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _writes_into(base: str, inside: str) -> bool:
    """Whether the process at ``base`` (/proc/PID) holds a file under ``inside`` open for writing (a reader such as
    ``tail -f`` on a log does not count)."""
    for fd in os.listdir(f"{base}/fd"):
        try:
            if not os.readlink(f"{base}/fd/{fd}").startswith(inside):
                continue
            with open(f"{base}/fdinfo/{fd}") as f:
                flags = next(int(ln.split()[1], 8) for ln in f if ln.startswith("flags:"))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
        if flags & os.O_ACCMODE != os.O_RDONLY:
            return True
    return False


def members(session_dir: str) -> set[int]:
    """Pids of this user's live processes that write a file in ``session_dir`` (every Ray process keeps its logs
    there open, whatever its title; a command line naming the directory does not count: ``tail -f`` on a log names
    it too); never this process nor its parent (the driver itself writes a log there, and :func:`stop` makes the
    guard sweep while the driver runs)."""
    root = os.path.realpath(session_dir).rstrip("/")
    uid, found = os.getuid(), set()
    spared = {os.getpid(), os.getppid()}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) in spared:
            continue
        base = f"/proc/{name}"
        try:
            if os.stat(base).st_uid != uid:
                continue
            with open(f"{base}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue  # already dead, waiting to be reaped
            if _writes_into(base, root + "/"):
                found.add(int(name))
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def sweep(session_dir: str, grace_s: float = 1.0, rounds: int = 3) -> set[int]:
    """SIGTERM every member of the instance, SIGKILL those still there after ``grace_s``; repeated (a process
    started meanwhile is found by the next round) until none is left. Returns the pids signalled."""
    hit: set[int] = set()
    for _ in range(rounds):
        pids = members(session_dir)
        if not pids:
            break
        hit |= pids
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pids:
                try:
                    os.kill(p, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if sig == signal.SIGTERM:
                end = time.monotonic() + grace_s
                while time.monotonic() < end and members(session_dir) & pids:
                    time.sleep(0.1)
                pids &= members(session_dir)
    return hit


def started_here(session_dir: str) -> bool:
    """Whether this process started the instance of ``session_dir``: one of its children (the raylet, the GCS) names
    that directory on its command line. A driver that joined an instance someone else started has no such child."""
    root = os.path.realpath(session_dir).rstrip("/").encode()
    me = str(os.getpid()).encode()
    try:
        names = os.listdir("/proc")
    except OSError:
        return False
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[1] != me:
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if root in f.read():
                    return True
        except (OSError, IndexError):
            continue
    return False


def start(session_dir: str | None) -> subprocess.Popen | None:
    """The guard for the private instance whose session directory is ``session_dir``; None where there is nothing
    to guard (no /proc, no session directory, an instance this process did not start). Close its ``stdin`` (see
    :func:`stop`) to make it sweep now, after ``ray.shutdown()``."""
    if not session_dir or not os.path.isdir("/proc") or not os.path.isdir(session_dir):
        return None
    if not started_here(session_dir):
        return None
    try:
        return subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), session_dir], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                cwd="/")
    except OSError:
        return None


def stop(guard: subprocess.Popen | None, wait_s: float = 10.0) -> None:
    """Make ``guard`` sweep now (its instance was shut down) and wait for it."""
    if guard is None:
        return
    try:
        guard.stdin.close()
        guard.wait(timeout=wait_s)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _main(argv: list[str]) -> int:
    session_dir = argv[1]
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    try:
        while sys.stdin.buffer.read(65536):  # nothing is ever written: this returns when the driver has ended
            pass
    except OSError:
        pass
    sweep(session_dir)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
