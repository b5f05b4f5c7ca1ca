"""Fan-out of per-image work: a pool of Ray actors (or this process), one cache part per batch.

Each actor builds its processor once (a model is loaded once per actor), takes batches of ``ImageRecord``s,
reads the images and writes the batch's arrays/tables/rows straight into the stage folder through the storage
URL, so only small summaries (counts, reasons, node) travel back to the driver: no image or array passes through
Ray's object store. ``ray.init(address=...)`` is the only thing that differs between a laptop
(``address=local``) and a cluster (``address=auto``, ``host:6379`` or ``ray://head:10001``).

The driver keeps at most ``in_flight_per_worker`` batches queued per actor (a 100k-image run holds a handful of
task specs, not 100k). A batch that fails for an infrastructure reason (worker died, OOM kill, disk full, node
lost: see :mod:`clips4.pipeline.failures`) is retried with exponential backoff, on a fresh actor where its actor
died; after ``max_attempts`` tries the run fails (:class:`RunFailed`, exit 1) and its images stay unprocessed for
the next run. Only an item's own errors become failed rows.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable


from clips4.pipeline.console import make_console
from clips4.pipeline.cache import ItemResult, StageWriter, UndeclaredOutputError, new_part_id
from clips4.pipeline.datasets import ImageRecord
from clips4.pipeline.failures import InfraError, is_infra, is_infra_message, plain_message, plain_reason
from clips4.pipeline.names import display
from clips4.pipeline.progress import make_progress

log = logging.getLogger(__name__)
console = make_console(stderr=True)


@dataclass
class BatchSummary:
    part: str
    ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: where the batch ran: ``host`` or ``host/<ray node id prefix>``
    node: str = ""


class RunFailed(RuntimeError):
    """The run could not finish for reasons outside its images; exit status 1. Finished parts stay reusable."""

    exit_code = 1


class RayConnectError(RuntimeError):
    """Ray could not be started or joined within the time limit; the message says why and what to do."""

    exit_code = 2


class WorkerStartError(RuntimeError):
    """The per-worker processor could not be built; nothing was processed."""


def _limit_threads(num_cpus: float) -> None:
    """One actor per core: keep OpenCV/BLAS/torch from oversubscribing the machine."""
    n = max(1, int(num_cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    # torch reads OMP_NUM_THREADS when it is imported; importing it here only to set it would cost a processor
    # that never needs torch (the classical detector) about 2 s per process
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def _run_processor(processor: Callable, records: list[ImageRecord]) -> list[ItemResult]:
    """Results for ``records``. A batch-level exception is split per image so that it lands on the image that
    caused it; an infrastructure error is raised (:class:`InfraError`), never recorded."""
    try:
        results = list(processor(records))
        if len(results) != len(records):
            raise RuntimeError(f"processor returned {len(results)} results for {len(records)} images")
    except UndeclaredOutputError:
        raise
    except Exception as exc:  # noqa: BLE001
        if is_infra(exc):
            raise InfraError(plain_reason(exc)) from exc
        if len(records) == 1:
            log.debug("item %s failed", records[0].image_id, exc_info=True)
            return [ItemResult.failed(plain_reason(exc))]
        return [r for rec in records for r in _run_processor(processor, [rec])]
    out = []
    for res in results:
        if isinstance(res, BaseException):
            if is_infra(res):
                raise InfraError(plain_reason(res)) from res
            res = ItemResult.failed(plain_reason(res))
        elif res.error:
            if is_infra_message(res.error):  # a processor caught e.g. ENOSPC and called it the image's failure
                raise InfraError(plain_message(res.error))
            res.error = plain_message(res.error)
        out.append(res)
    return out


def process_batch(processor: Callable, records: list[ImageRecord], sigs: list[str], stage_url: str,
                  node: str = "") -> BatchSummary:
    """Run ``processor`` on ``records`` and write one part. Item errors are rows; infrastructure errors raise."""
    part = new_part_id()
    t0 = time.perf_counter()
    results = _run_processor(processor, records)
    elapsed = time.perf_counter() - t0
    rows, summary = [], BatchSummary(part=part, seconds=elapsed, node=node or socket.gethostname())
    for rec, sig, res in zip(records, sigs, results):
        row = {
            **rec.to_dict(),
            "source_sig": sig,
            "status": "failed" if res.error else "ok",
            "error": res.error or "",
            "part": part,
            "seconds": float(res.row.pop("seconds", elapsed / max(1, len(records)))),
        }
        if res.error:
            res.arrays, res.tables = {}, {}
            summary.failed.append((rec.image_id, res.error))
        else:
            row.update(res.row)
            summary.ok += 1
        rows.append(row)
    originals = [dict(r) for r in rows]
    try:
        StageWriter(stage_url).write_part(part, rows, results)
    except UndeclaredOutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the machine's fault, unless one item's data cannot be stored
        if is_infra(exc):
            raise InfraError(f"writing part {part} to {stage_url}: {plain_reason(exc)}") from exc
        return _write_one_by_one(originals, results, stage_url, summary, exc)
    return summary


def _write_one_by_one(rows: list[dict], results: list[ItemResult], stage_url: str, summary: BatchSummary,
                      first: BaseException) -> BatchSummary:
    """A part that could not be written for a reason that is not the machine's (a value the cache cannot hold):
    each item is written as its own part, and an item that still cannot be written becomes a failed row with the
    reason, so one item never keeps the others of its batch from being stored. Leftovers of the failed write are
    orphans that the next commit removes."""
    log.warning("writing a part of %d items failed (%s); writing them one by one", len(rows), plain_reason(first))
    writer = StageWriter(stage_url)
    summary.ok, summary.failed = 0, []
    for row, res in zip(rows, results):
        try:
            pid = new_part_id()
            writer.write_part(pid, [{**row, "part": pid}], [res])
            if row["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed.append((row["image_id"], row["error"]))
            continue
        except UndeclaredOutputError:
            raise
        except Exception as exc:  # noqa: BLE001
            if is_infra(exc):
                raise InfraError(f"writing to {stage_url}: {plain_reason(exc)}") from exc
            reason = f"its results cannot be stored in the cache: {plain_reason(exc)}"
        bad = {k: row[k] for k in ("image_id", "path", "split", "gt_path", "height", "width", "source_sig", "part",
                                    "seconds") if k in row}
        pid = new_part_id()
        bad.update(status="failed", error=reason, part=pid)
        try:
            writer.write_part(pid, [bad], [ItemResult.failed(reason)])
        except Exception as exc:  # noqa: BLE001 - not even a failed row: the run cannot go on
            raise InfraError(f"writing to {stage_url}: {plain_reason(exc)}") from exc
        summary.failed.append((row["image_id"], reason))
    return summary


class _Worker:
    """Body of a Ray actor: builds the processor once, then serves batches."""

    def __init__(self, factory: Callable[[], Callable], num_cpus: float, stage_url: str):
        _limit_threads(num_cpus)
        self.processor = factory()
        self.stage_url = stage_url
        import ray

        self.node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"

    def ready(self) -> str:
        return self.node

    def run(self, records: list[ImageRecord], sigs: list[str]) -> BatchSummary:
        return process_batch(self.processor, records, sigs, self.stage_url, node=self.node)


# ------------------------------------------------------------------------------------------------ Ray
_PROBE = """
import logging, sys, ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, include_dashboard=False, log_to_driver=False)
print("nodes", sum(1 for n in ray.nodes() if n.get("Alive")), flush=True)
"""


def _probe_cluster(address: str, timeout_s: float) -> None:
    """Join ``address`` from a throw-away process first: Ray retries some failures (e.g. a missing auth token)
    forever inside ``ray.init``; a child process can be killed when it takes too long."""
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:
        try:  # nothing listening there: say so now instead of after Ray's own retries
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)).close()
        except OSError as exc:
            raise RayConnectError(f"no Ray cluster at {address!r} ({plain_reason(exc)}): start one there "
                                  "(`ray start --head`), fix --address, or use --address local") from None
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True, timeout=timeout_s,
                           env=env, start_new_session=True)
        out, code = (p.stdout or "") + (p.stderr or ""), p.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code = None
    if code == 0:
        return
    text = plain_message(out, limit=100000)
    hint = ""
    if "auth" in text.lower() or "token" in text.lower():
        hint = (" The cluster requires token authentication: export RAY_AUTH_MODE=token and the cluster's token as "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH=file, or put it in ~/.ray/auth_token); see docs/operations.md, 'Ray'.")
    elif "Could not find any running Ray instance" in text or "ConnectionError" in text:
        hint = " No Ray cluster is running there: start one (`ray start --head`) or use --address local."
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-3:]
    why = "timed out after %.0f s" % timeout_s if code is None else f"failed (exit {code})"
    raise RayConnectError(f"joining the Ray cluster at {address!r} {why}.{hint}"
                          + (f" Last output: {plain_message(' | '.join(last), 600)}" if last else ""))


#: the address this process joined with :func:`init_ray` (None: Ray was started by someone else, or not at all)
_JOINED: str | None = None
#: the guard of the private instance this process started (:mod:`clips4.pipeline.rayguard`), if any
_GUARD: subprocess.Popen | None = None


class _keep_signal_handlers:
    """Ray's core worker installs native handlers for SIGTERM (and others) in the driver when it starts: a SIGTERM
    then prints a native "*** SIGTERM received" dump and ends the process with 134 or 15 instead of reaching the
    Python handler that keeps finished parts and exits 143. Within this block's end, Python's handlers for SIGTERM
    and SIGINT are put back (main thread only)."""

    def __enter__(self):
        import signal
        import threading

        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        import signal

        for s, h in self.saved.items():
            if h is not None:
                signal.signal(s, h)
        return False


def init_ray(address: str = "local", num_cpus: int | None = None, connect_timeout_s: float = 60.0,
             temp_dir: str | None = None) -> None:
    """Start or join Ray. ``local`` starts a private instance (its processes die with this one: Ray ties the
    head's raylet and GCS to the driver, and a guard process, :mod:`clips4.pipeline.rayguard`, stops the rest when
    the driver ends, even by SIGKILL) whose session files go under ``temp_dir`` (``ray.temp_dir``; None:
    Ray's default, ``$RAY_TMPDIR`` or /tmp/ray) — or, when ``$RAY_ADDRESS`` names a long-lived instance
    (``ray start --head``), joins that one; anything else is joined after a bounded probe. Python's SIGTERM
    and SIGINT handlers stay in force (see :class:`_keep_signal_handlers`)."""
    import ray

    global _JOINED, _GUARD
    from clips4.pipeline import rayguard

    if address in ("local", "", None) and os.environ.get("RAY_ADDRESS"):
        # every command joins the long-lived instance instead of paying for a private start-up (ray.init would
        # refuse num_cpus for an existing instance anyway)
        address = os.environ["RAY_ADDRESS"]
    if ray.is_initialized():
        if _JOINED == address:
            return
        ray.shutdown()  # joined elsewhere earlier in this process (tests, notebooks): join what is asked now
    rayguard.stop(_GUARD)  # an instance started earlier is shut down by now: its guard sweeps what is left
    _GUARD, _JOINED = None, None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    from clips4.pipeline.storage import worker_env

    env = worker_env()
    if env:  # workers on other machines reach the same object store (endpoint, credentials) as this driver
        kwargs["runtime_env"] = {"env_vars": env}
    if address in ("local", "", None):
        if temp_dir:
            kwargs["_temp_dir"] = os.path.abspath(os.path.expanduser(temp_dir))
            os.makedirs(kwargs["_temp_dir"], exist_ok=True)
        with _keep_signal_handlers():
            ctx = ray.init(num_cpus=num_cpus, **kwargs)
        # only an instance this process started (not one ray.init found running) gets a guard
        _GUARD = rayguard.start(getattr(ctx, "address_info", {}).get("session_dir"))
        _JOINED = address
    else:
        _probe_cluster(address, connect_timeout_s)
        try:
            with _keep_signal_handlers():
                ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise RayConnectError(f"joining the Ray cluster at {address!r} failed: {plain_reason(exc)}") from None
        _JOINED = address


def _actor_dead(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                         "NodeDiedError", "LocalRayletDiedError", "ActorUnschedulableError"})


def _unmasked(fn, *args, **kwargs):
    """Call a Ray function; a signal handled while it ran in native code surfaces as ``SystemError(... returned a
    result with an exception set)`` caused by our :class:`~clips4.pipeline.failures._Signalled`: raise that instead,
    so SIGTERM/SIGINT end the run as an interruption (143/130), not as a failed batch."""
    from clips4.pipeline.failures import _Signalled

    try:
        return fn(*args, **kwargs)
    except SystemError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (_Signalled, KeyboardInterrupt)):
            raise cause from None
        raise


def resolve_executor(executor: str, address: str | None, num_workers: int, n_items: int, local_below: int) -> str:
    """``ray`` or ``local`` for a run of ``n_items``: ``auto`` stays in this process when one worker is asked for or
    the work is small on this machine (Ray's start-up, about 10 s, would cost more than the fan-out saves); a
    cluster address always fans out."""
    if executor != "auto":
        return executor
    if address not in ("local", "", None) or os.environ.get("RAY_ADDRESS"):
        return "ray"  # a cluster, or a long-lived instance that is already started
    return "local" if num_workers <= 1 or n_items < local_below else "ray"


def run_batches(
    factory: Callable[[], Callable],
    work: list[tuple[ImageRecord, str]],
    stage_url: str,
    *,
    executor: str = "ray",
    address: str = "local",
    num_workers: int = 2,
    batch_size: int = 8,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    description: str = "images",
    show_progress: bool = True,
    max_attempts: int = 3,
    backoff_s: float = 1.0,
    in_flight_per_worker: int = 2,
    connect_timeout_s: float = 60.0,
    progress_every_s: float = 30.0,
    temp_dir: str | None = None,
    stats: dict | None = None,
) -> list[BatchSummary]:
    """Process ``work`` ((record, source signature) pairs) in batches; returns one summary per finished batch.

    ``stats`` (if given) receives ``per_node`` (items per node), ``max_in_flight``, ``retries`` and
    ``max_result_bytes`` (largest batch result that came back to the driver through Ray).
    Raises :class:`RunFailed` when a batch fails ``max_attempts`` times for infrastructure reasons.
    """
    batches = [work[i : i + batch_size] for i in range(0, len(work), batch_size)]
    summaries: list[BatchSummary] = []
    st = stats if stats is not None else {}
    st.update(per_node={}, max_in_flight=0, retries=0, max_result_bytes=0)
    progress = make_progress(description, len(work), show_progress, every_s=progress_every_s)
    n_done = n_failed = 0

    def done(s: BatchSummary) -> None:
        nonlocal n_done, n_failed
        summaries.append(s)
        n_done += s.ok + len(s.failed)
        n_failed += len(s.failed)
        st["per_node"][s.node] = st["per_node"].get(s.node, 0) + s.ok + len(s.failed)
        progress.update(n_done, n_failed)

    def give_up(b: list, attempts: int, exc: BaseException) -> RunFailed:
        left = len(work) - n_done
        return RunFailed(
            f"{description}: a batch of {len(b)} image(s) (first: {display(b[0][0].image_id)}) failed {attempts} time(s) "
            f"for a reason outside the images: {plain_reason(exc)}. {left} image(s) are left unprocessed "
            "(none recorded as failed); run again once the cause is fixed."
        )

    def retry_later(attempts: int, b: list, exc: BaseException) -> float:
        st["retries"] += 1
        delay = backoff_s * 2 ** (attempts - 1)
        log.warning("%s: batch of %d (first %s) failed (%s); retry %d/%d in %.1f s", description, len(b),
                    display(b[0][0].image_id), plain_reason(exc), attempts, max_attempts - 1, delay)
        return delay

    with progress:
        if executor == "local" or not batches:
            _limit_threads(num_cpus)
            processor = factory() if batches else None
            for b in batches:
                attempts = 0
                while True:
                    st["max_in_flight"] = 1
                    try:
                        done(process_batch(processor, [r for r, _ in b], [s for _, s in b], stage_url))
                        break
                    except UndeclaredOutputError:  # the code and stages.yaml disagree: no retry helps
                        raise
                    except Exception as exc:  # noqa: BLE001 - item errors never get here; this is the machine
                        attempts += 1
                        if attempts >= max_attempts:
                            raise give_up(b, attempts, exc) from None
                        time.sleep(retry_later(attempts, b, exc))
            return summaries

        import ray

        init_ray(address, num_cpus=None, connect_timeout_s=connect_timeout_s, temp_dir=temp_dir)
        n_workers = max(1, min(num_workers, len(batches)))
        Actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_Worker)
        live: dict[int, Any] = {}          # actor id -> handle (ready)
        starting: dict[Any, tuple[int, Any]] = {}  # ready ref -> (actor id, handle)
        load: dict[int, int] = {}          # actor id -> batches in flight
        pending: dict[Any, tuple[int, int, int]] = {}  # task ref -> (actor id, batch index, attempts so far)
        queue: collections.deque = collections.deque((i, 0, 0.0) for i in range(len(batches)))
        next_id = 0
        spawns_left = n_workers * max_attempts  # replacements for dead actors are bounded too

        def spawn() -> None:
            nonlocal next_id
            a = Actor.remote(factory, num_cpus, stage_url)
            starting[a.ready.remote()] = (next_id, a)
            next_id += 1

        def drop(aid: int) -> None:
            nonlocal spawns_left
            if aid in live:
                try:
                    ray.kill(live.pop(aid), no_restart=True)
                except Exception:  # noqa: BLE001 - gone with its node already
                    pass
                load.pop(aid, None)
                if spawns_left > 0:
                    spawns_left -= 1
                    spawn()

        for _ in range(n_workers):
            spawn()
        try:
            while queue or pending:
                now = time.monotonic()
                # dispatch: least-loaded ready actor first, never more than in_flight_per_worker each
                for _ in range(len(queue)):
                    cands = [a for a in live if load[a] < in_flight_per_worker]
                    if not cands:
                        break
                    i, attempts, not_before = queue[0]
                    if not_before > now:
                        queue.rotate(-1)
                        continue
                    queue.popleft()
                    aid = min(cands, key=lambda a: load[a])
                    b = batches[i]
                    pending[live[aid].run.remote([r for r, _ in b], [s for _, s in b])] = (aid, i, attempts)
                    load[aid] += 1
                st["max_in_flight"] = max(st["max_in_flight"], len(pending))
                if not live and not starting:
                    raise RunFailed(f"{description}: no Ray worker is left to run the remaining batches "
                                    f"({len(work) - n_done} image(s) unprocessed); see the errors above")
                refs = list(pending) + list(starting)
                if not refs:  # only batches waiting out their backoff
                    time.sleep(0.1)
                    continue
                ready, _ = _unmasked(ray.wait, refs, num_returns=1, timeout=0.5)
                progress.tick()
                for ref in ready:
                    if ref in starting:
                        aid, handle = starting.pop(ref)
                        try:
                            _unmasked(ray.get, ref)
                        except Exception as exc:  # noqa: BLE001
                            if _actor_dead(exc) or is_infra(exc):
                                log.warning("%s: a worker was lost while starting (%s)", description, plain_reason(exc))
                                if spawns_left > 0:
                                    spawns_left -= 1
                                    spawn()
                                continue
                            # the processor cannot be built (missing weights, bad params): stop with its message
                            raise WorkerStartError(f"{description} workers could not start: {plain_reason(exc)}") from None
                        live[aid], load[aid] = handle, 0
                        continue
                    aid, i, attempts = pending.pop(ref)
                    if aid in load:
                        load[aid] -= 1
                    try:
                        s = _unmasked(ray.get, ref)
                        # what came back through the object store: counts and reasons only, never pixels
                        st["max_result_bytes"] = max(st["max_result_bytes"], len(pickle.dumps(s)))
                        done(s)
                    except UndeclaredOutputError:  # the code and stages.yaml disagree: no retry helps
                        raise
                    except Exception as exc:  # noqa: BLE001 - the machine's fault: retry with backoff
                        attempts += 1
                        if attempts >= max_attempts:
                            raise give_up(batches[i], attempts, exc) from None
                        if _actor_dead(exc):
                            drop(aid)  # its other queued batches fail the same way and are requeued too
                        queue.append((i, attempts, time.monotonic() + retry_later(attempts, batches[i], exc)))
        finally:
            for handle in [*live.values(), *(h for _, h in starting.values())]:
                try:
                    ray.kill(handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone with its node
                    pass
    return summaries
