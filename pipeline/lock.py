"""One writer per stage output: a lock file ``<stage folder>/.lock`` naming its holder (host, pid, start time).

Local folders (and NFS mounts, where the kernel forwards the lock to the server) use ``flock``: the kernel drops
the lock when the holder dies, so a lock left by a killed run is never an obstacle (stale detection is exact).
The file's content only names the holder for the message a second run prints.

Other fsspec roots (``s3://``, ``gs://`` …) have no atomic create-if-absent in fsspec, so the lock there is best
effort: the file carries a heartbeat that the holder rewrites every ``heartbeat_s``; a lock whose holder is a dead
pid on this host, or whose heartbeat is older than ``stale_after_s``, is stale and taken over. Two runs that start
within the same instant on an object store may both believe they hold it; the commit-by-index rule still keeps
the cache consistent then (parts are unique, the newest row wins), only work is duplicated.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import fsspec

LOCK = ".lock"


class StageLocked(RuntimeError):
    """Another run holds the stage output; exit status 3."""

    exit_code = 3

    def __init__(self, url: str, holder: dict, waited_s: float | None = None):
        self.url, self.holder = url, holder
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
               if holder else "another run (holder unknown)")
        cmd = holder.get("argv") if holder else None
        waited = f" (waited {waited_s:.0f} s)" if waited_s else ""
        super().__init__(
            f"{url} is being written by {who}{' — ' + cmd if cmd else ''}{waited}; "
            "wait for it (--wait) or run again later"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _holder_info(token: str) -> dict:
    import sys

    now = time.time()
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "token": token,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)), "started_ts": now, "heartbeat": now,
        "argv": " ".join(sys.argv[:6])[:200],
    }


def _make_local_folders(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` that outlasts a releasing holder removing the same (empty) folders
    while they are being made (os.makedirs then raises FileNotFoundError or FileExistsError)."""
    for _ in range(1000):
        try:
            os.makedirs(path, exist_ok=True)
            return
        except (FileNotFoundError, FileExistsError):
            if os.path.isdir(path):
                return
    os.makedirs(path, exist_ok=True)


class StageLock:
    """Context manager: ``with StageLock(url, wait=True, timeout=600): ...``.

    ``wait=False`` raises :class:`StageLocked` at once when another run holds the lock; ``wait=True`` polls until
    it is free or ``timeout`` seconds passed (None: forever), then raises :class:`StageLocked`.
    """

    def __init__(self, url: str, *, wait: bool = False, timeout: float | None = None, poll_s: float = 0.5,
                 stale_after_s: float = 300.0, heartbeat_s: float = 30.0):
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.lock_path = f"{self.path}/{LOCK}"
        self.wait, self.timeout, self.poll_s = wait, timeout, poll_s
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        proto = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        #: True where the OS guarantees mutual exclusion (local folders); False = best effort (object stores)
        self.exclusive = ("file" in proto or "local" in proto) and os.name == "posix"
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._created: list[str] = []
        self.held = False
        #: why the last heartbeat failed (None: it did not)
        self.beat_error: str | None = None

    # -- public --------------------------------------------------------------------------------------------
    def acquire(self) -> "StageLock":
        from clips4.pipeline.storage import makedirs

        t0 = time.monotonic()
        if self.exclusive:  # the folders this lock brings into being go again if the run leaves nothing in them
            p, self._created = os.path.abspath(self.path), []
            while not os.path.exists(p) and os.path.dirname(p) != p:
                self._created.append(p)
                p = os.path.dirname(p)
        if self.exclusive:
            _make_local_folders(self.path)
        else:
            makedirs(self.fs, self.path)
        while True:
            holder = self._try_local() if self.exclusive else self._try_remote()
            if holder is None:
                self.held = True
                return self
            waited = time.monotonic() - t0
            if not self.wait or (self.timeout is not None and waited >= self.timeout):
                raise StageLocked(self.url, holder, waited if self.wait else None)
            time.sleep(self.poll_s)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.exclusive:
            import fcntl

            assert self._fd is not None
            # A folder that holds nothing but the lock (a refused command, a run that wrote nothing) is left as it
            # was: the lock file goes while still locked (a waiter that then gets the old inode sees that it is
            # no longer the file at that path, and tries again: _try_local), then the folders it created.
            try:
                alone = os.listdir(self.path) == [LOCK]
            except OSError:
                alone = False
            if alone:
                try:
                    os.unlink(self.lock_path)
                except OSError:
                    alone = False
            if not alone:
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if alone:
                for d in self._created:
                    try:
                        os.rmdir(d)
                    except OSError:
                        break
        else:
            self._stop.set()
            if self._beat is not None:
                self._beat.join(timeout=5)
            try:
                if self._read_remote().get("token") == self.token:
                    self.fs.rm(self.lock_path)
            except Exception:  # noqa: BLE001 - the store went away (botocore's errors are not OSErrors): it goes stale
                pass

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local: flock --------------------------------------------------------------------------------------
    def _try_local(self) -> dict | None:
        import fcntl

        fd = self._open_local()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:  # the holder may have removed the file before unlocking it (release): lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                return self._try_local()
        except BlockingIOError:
            os.close(fd)
            return self._read_local_holder()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info(self.token)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return None

    def _open_local(self) -> int:
        """The lock file, opened (created if absent). A holder that releases removes the folders it created
        (release) and may do so between any two of our steps, so the folders are made again until the open
        succeeds."""
        for _ in range(1000):
            try:
                return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                _make_local_folders(self.path)
        return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)

    def _read_local_holder(self, patience_s: float = 1.0) -> dict:
        """The holder's record; the holder writes it just after taking the lock, so an empty file is read again
        for a moment rather than reported as an unknown holder."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                with open(self.lock_path) as f:
                    text = f.read()
                holder = json.loads(text) if text.strip() else {}
            except (OSError, ValueError):  # a half-written record: read it again
                holder = {}
            if holder or time.monotonic() >= deadline:
                return holder
            time.sleep(0.02)

    # -- object stores: heartbeat file ---------------------------------------------------------------------
    def _read_remote(self) -> dict:
        try:
            with self.fs.open(self.lock_path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except (FileNotFoundError, ValueError):
            return {}

    def is_stale(self, holder: dict) -> bool:
        if not holder:
            return True
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return True
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def _write_remote(self, info: dict) -> None:
        with self.fs.open(self.lock_path, "wb") as f:  # one PUT on object stores
            f.write(json.dumps(info).encode())

    def _try_remote(self) -> dict | None:
        if self.fs.exists(self.lock_path):
            holder = self._read_remote()
            if not self.is_stale(holder):
                return holder
        self._write_remote(_holder_info(self.token))
        time.sleep(min(0.2, self.poll_s))  # a racing writer's PUT lands in this window; the last one wins
        holder = self._read_remote()
        if holder.get("token") != self.token:
            return holder
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="clips4-lock-heartbeat", daemon=True)
        self._beat.start()
        return None

    def _heartbeat(self) -> None:
        """Rewrite the heartbeat every ``heartbeat_s``. Never raises: a beat that fails (the store unreachable —
        botocore's errors are not OSErrors) only makes the lock look older; the first failure of a streak is one
        warning line, and ``self.beat_error`` keeps the last reason (the run's own reads and writes fail on their
        own and end it with their message)."""
        import logging

        try:
            info = self._read_remote() or _holder_info(self.token)
        except Exception:  # noqa: BLE001 - see below
            info = _holder_info(self.token)
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            info["heartbeat"] = time.time()
            try:
                self._write_remote(info)
                failing, self.beat_error = False, None
            except Exception as exc:  # noqa: BLE001
                self.beat_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                if not failing:
                    logging.getLogger(__name__).warning("lock heartbeat of %s failed (%s); retrying", self.url,
                                                        self.beat_error)
                failing = True


def lock_holder(url: str) -> dict | None:
    """Who holds the lock of the stage output ``url`` now (the holder's record, ``{}`` when unnamed), or None when
    nobody does. Never creates anything (``clips4 status`` asks this of folders it only reads)."""
    lock = StageLock(url)
    try:
        if not lock.fs.exists(lock.lock_path):
            return None
    except OSError:
        return None
    if not lock.exclusive:
        holder = lock._read_remote()
        return holder if holder and not lock.is_stale(holder) else None
    import fcntl

    try:
        fd = os.open(lock.lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            with open(lock.lock_path) as f:
                text = f.read()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
