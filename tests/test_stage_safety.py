"""Unattended runs of a stage: infrastructure errors vs item errors, earlier failures, corrupt parts, locks,
garbage, cron-grade logs and signals."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clips4.pipeline import stage as stage_mod
from clips4.pipeline.cache import ItemResult, StageReader, StageWriter
from clips4.pipeline.failures import is_infra, plain_reason
from clips4.pipeline.lock import StageLock, StageLocked
from clips4.pipeline.runner import RunFailed
from conftest import box_images
from test_stage_framework import ToyParams, ToyProcessor, _cfg, toy_stage  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]


class FlakyDisk(ToyProcessor):
    """The disk is full for the first ``FULL`` batches, then fine."""

    FULL = 1
    seen = 0

    def __call__(self, records):
        FlakyDisk.seen += 1
        if FlakyDisk.seen <= FlakyDisk.FULL:
            raise OSError(errno.ENOSPC, "No space left on device", "/cache/parts/x.zarr")
        return super().__call__(records)


class CaughtDiskFull(ToyProcessor):
    """A processor that (wrongly) calls a full disk the image's failure, with colour codes, like Ray prints it."""

    def __call__(self, records):
        return [ItemResult.failed("\x1b[36mray::_Worker.run()\x1b[39m OSError: [Errno 28] No space left on device")
                for _ in records]


class Picky(ToyProcessor):
    """Raises for the whole batch when one image (img3) is in it: only img3 may be recorded as failed."""

    def __call__(self, records):
        if any(r.image_id == "img3" for r in records):
            raise ValueError("img3 has a feature this processor cannot handle")
        return super().__call__(records)


def _use(monkeypatch, cls):
    """Run the toy stage with ``cls`` as its processor."""
    real = stage_mod.stage_object
    monkeypatch.setattr(stage_mod, "stage_object", lambda run: cls if "ToyProcessor" in run else real(run))


def _fast_retries(*extra):
    return ["ray.backoff_s=0.01", *extra]


def test_infrastructure_errors_are_retried_not_recorded(tmp_path, image_folder, toy_stage, monkeypatch):
    _use(monkeypatch, FlakyDisk)
    FlakyDisk.seen, FlakyDisk.FULL = 0, 1
    cfg = _cfg(tmp_path, image_folder, *_fast_retries())
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert run.failed == [] and run.retries == 1 and len(StageReader(run.url)) == 6
    assert StageReader(run.url).errors().num_rows == 0


def test_persistent_infrastructure_error_fails_the_run_and_leaves_images_for_later(tmp_path, image_folder, toy_stage,
                                                                                   monkeypatch):
    _use(monkeypatch, FlakyDisk)
    FlakyDisk.seen, FlakyDisk.FULL = 0, 10**6
    cfg = _cfg(tmp_path, image_folder, *_fast_retries("ray.max_attempts=2"))
    with pytest.raises(RunFailed, match="No space left on device") as ei:
        stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert ei.value.exit_code == 1 and "6 image(s) are left unprocessed" in str(ei.value)
    url, _, _ = stage_mod.stage_url(cfg, "toy", stage_mod.dataset_from_config(cfg))
    assert StageWriter(url).part_rows() is None, "no image may be recorded as failed"
    assert not Path(url, "index.parquet").exists()
    # the disk is fine again: a rerun does all six
    FlakyDisk.FULL = 0
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert run.processed == 6 and run.failed == [] and len(StageReader(url)) == 6


def test_infra_text_reported_as_item_failure_is_not_recorded(tmp_path, image_folder, toy_stage, monkeypatch):
    _use(monkeypatch, CaughtDiskFull)
    cfg = _cfg(tmp_path, image_folder, *_fast_retries("ray.max_attempts=2"))
    with pytest.raises(RunFailed) as ei:
        stage_mod.run_stage(cfg, "toy", show_progress=False)
    msg = str(ei.value)
    assert "No space left on device" in msg and "\x1b" not in msg


def test_batch_exception_is_charged_to_the_image_that_caused_it(tmp_path, image_folder, toy_stage, monkeypatch):
    _use(monkeypatch, Picky)
    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert run.failed == [("img3", "ValueError: img3 has a feature this processor cannot handle")]
    assert len(StageReader(run.url)) == 5


def test_ray_error_wrappers_become_plain_root_causes():
    ray_exceptions = pytest.importorskip("ray.exceptions")
    cause = OSError(errno.ENOSPC, "No space left on device", "/c/parts/p.zarr")
    wrapped = ray_exceptions.RayTaskError(
        "_Worker.run", "Traceback (most recent call last):\n  \x1b[36mray::_Worker.run()\x1b[39m\nOSError: ...", cause)
    reason = plain_reason(wrapped)
    assert reason == "OSError: [Errno 28] No space left on device: '/c/parts/p.zarr'"
    assert is_infra(wrapped) and is_infra(ray_exceptions.ActorDiedError())
    assert not is_infra(ValueError("cannot identify image file 'x.jpg'"))


def test_rerun_counts_earlier_failures_and_retry_failed_reprocesses(tmp_path, image_folder, toy_stage):
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = _cfg(tmp_path, image_folder)
    first = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert [i for i, _ in first.failed] == ["broken"]
    again = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert again.nothing_to_do and [i for i, _ in again.failed_before] == ["broken"]
    assert "broken.jpg" in again.failed_before[0][1]
    assert stage_mod.print_summary(again, max_failures=0) == 1, "a rerun must not hide the earlier failure"
    assert stage_mod.print_summary(again, max_failures=1) == 0
    ToyProcessor.calls = []
    retried = stage_mod.run_stage(cfg, "toy", show_progress=False, retry_failed=True)
    assert retried.processed == 1 and [i for i, _ in retried.failed] == ["broken"] and retried.failed_before == []


def test_cli_rerun_exits_1_while_failures_remain(tmp_path, capsys):
    from clips4.cli import main
    from test_segments_stage import _cli

    root = box_images(tmp_path / "imgs", 2)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    assert main(_cli(tmp_path / "cache", root)) == 1
    assert main(_cli(tmp_path / "cache", root)) == 1
    err = capsys.readouterr().err
    assert "1 of them failed" in err and "broken.jpg" in err.split("nothing left to do")[-1]
    assert main(_cli(tmp_path / "cache", root, "--max-failures", "1")) == 0


def test_corrupt_part_is_named_moved_aside_and_recomputed(tmp_path, image_folder, toy_stage):
    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    parts = sorted(Path(run.url, "parts").glob("*.parquet"))
    assert len(parts) == 2  # 6 images in batches of 4
    victim = parts[0]
    lost = set(pq.read_table(victim)["image_id"].to_pylist())
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.raises(Exception, match=re.escape(victim.name)):
        StageWriter(run.url).part_rows()  # readers name the file
    # committed: the index holds the part's rows (a rerun opens only the records it does not name), so the
    # damaged record costs nothing — the arrays are read through the index
    ToyProcessor.calls = []
    assert stage_mod.run_stage(cfg, "toy", show_progress=False).processed == 0 and not ToyProcessor.calls
    assert len(StageReader(run.url)) == 6
    # not committed (the run was killed before its index write): the damaged record is moved aside, recomputed
    Path(run.url, "index.parquet").unlink()
    again = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert [Path(f).name for f, _ in again.quarantined] == [victim.name]
    assert set(ToyProcessor.calls) == lost and again.processed == len(lost)
    assert Path(run.url, "quarantine", victim.name).exists() and not victim.exists()
    r = StageReader(run.url)
    assert len(r) == 6
    np.testing.assert_array_equal(r.get(sorted(lost)[0], "gray").shape[:2],
                                  np.asarray(Image.open(image_folder / f"{sorted(lost)[0]}.png")).shape[:2])


def test_commit_collects_superseded_parts_orphans_and_temp_files(tmp_path, image_folder, toy_stage):
    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    base = Path(run.url)
    first_parts = {p.stem for p in (base / "parts").glob("*.parquet")}
    # leftovers of a killed run and of a racing run: an orphan .zarr, a temp file, a duplicate part
    (base / "parts" / "0-orphan.zarr").mkdir()
    (base / "parts" / "0-orphan.zarr" / "zarr.json").write_text("{}")
    (base / "tables" / "segs" / "x.parquet.tmp-abcd1234").write_bytes(b"half")
    from clips4.pipeline.datasets import source_signature
    from clips4.pipeline.runner import process_batch

    ds = stage_mod.dataset_from_config(cfg)
    recs = ds.records()
    process_batch(ToyProcessor(ToyParams(), {}), recs, [source_signature(r.path) for r in recs], run.url)
    w = StageWriter(run.url)
    w.commit(exclusive=True)  # the first commit after the duplicates keeps what the previous index named
    w.commit(exclusive=True)
    parts = {p.stem for p in (base / "parts").glob("*.parquet")}
    assert len(parts) == 1 and not parts & first_parts
    assert {p.name for p in (base / "parts").glob("*.zarr")} == {f"{p}.zarr" for p in parts}
    assert not list(base.rglob("*.tmp-*"))
    assert {p.stem for p in (base / "tables" / "segs").glob("*.parquet")} == parts
    assert len(StageReader(run.url)) == 6


# ------------------------------------------------------------------------------------------------ locks
def test_lock_names_its_holder_and_is_free_after_the_holder_dies(tmp_path):
    url = str(tmp_path / "stage")
    code = ("import sys, time; from clips4.pipeline.lock import StageLock; l = StageLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageLocked, match=f"pid {holder.pid} on ") as ei:
            StageLock(url).acquire()
        assert ei.value.exit_code == 3
        t0 = time.monotonic()
        with pytest.raises(StageLocked, match="waited"):
            StageLock(url, wait=True, timeout=0.6, poll_s=0.1).acquire()
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    with StageLock(url) as lock:  # the kernel released the dead holder's lock: no stale lock to clear
        assert lock.held and lock.exclusive
        assert json.loads(Path(url, ".lock").read_text())["pid"] == os.getpid()


def test_object_store_lock_detects_stale_holders():
    import socket

    import fsspec

    url = "memory://clips4-lock-test/stage"
    fs = fsspec.filesystem("memory")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fs.pipe("/clips4-lock-test/stage/.lock", json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": time.time(), "token": "x"}).encode())
    with StageLock(url, heartbeat_s=0.05) as lock:  # a dead pid on this host: stale
        assert not lock.exclusive and json.loads(fs.cat("/clips4-lock-test/stage/.lock"))["token"] == lock.token
        with pytest.raises(StageLocked):
            StageLock(url).acquire()  # a live holder with a fresh heartbeat
    assert not fs.exists("/clips4-lock-test/stage/.lock")
    fs.pipe("/clips4-lock-test/stage/.lock", json.dumps(
        {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600, "token": "y"}).encode())
    with StageLock(url, stale_after_s=600):  # another host's lock without a heartbeat for an hour: stale
        pass


def _segments_cmd(cache: Path, root: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "clips4.cli", "precompute", "segments", "--dataset", "folder", "--root",
            str(root), "--cache", str(cache), "--executor", "local", *extra]


def _wait_for(pred, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_concurrent_runs_one_exits_3_one_waits_and_no_duplicate_parts(tmp_path):
    root = box_images(tmp_path / "imgs", 12)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # three identical runs started together: whichever takes the lock first works, the plain ones exit 3 naming
    # it, the one with --wait waits for it and then finds nothing left to do (or works first, when it won)
    cmds = [_segments_cmd(cache, root, "--batch-size", "1", "-q"), _segments_cmd(cache, root, "--batch-size", "1", "-q"),
            _segments_cmd(cache, root, "--batch-size", "1", "-q", "--wait", "--wait-timeout", "600")]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    try:
        codes = [p.wait(timeout=600) for p in procs]
        errs = [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert codes[2] == 0, errs[2]
    assert sorted(codes[:2]) in ([0, 3], [3, 3]), errs
    pids = {p.pid for p in procs}
    for code, err in zip(codes, errs):
        if code == 3:
            holder = int(re.search(r"being written by pid (\d+) on ", err).group(1))
            assert holder in pids and "--wait" in err and "Traceback" not in err
    (stage,) = cache.glob("*/segments/*")
    rows = pq.read_table(stage / "index.parquet")
    assert rows.num_rows == 12 and set(rows["status"].to_pylist()) == {"ok"}
    part_ids = [pq.read_table(p)["image_id"].to_pylist() for p in (stage / "parts").glob("*.parquet")]
    flat = [i for ids in part_ids for i in ids]
    assert len(flat) == len(set(flat)) == 12, "an image was processed twice"


# ------------------------------------------------------------------------------------- logs and signals
@pytest.mark.slow
def test_progress_lines_when_output_is_a_file_and_long_paths_unbroken(tmp_path):
    deep = tmp_path / ("a_rather_long_folder_name_for_a_cron_job_" * 3) / "and_deeper_still_x"
    root = box_images(deep / "imgs", 12)
    cache = deep / "cache"
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        p = subprocess.run(_segments_cmd(cache, root, "--batch-size", "1", "--set", "ray.progress_every_s=0.5"),
                           stdout=f, stderr=subprocess.STDOUT, timeout=300, env={**os.environ, "COLUMNS": "80"})
    text = log.read_text()
    assert p.returncode == 0, text
    assert "\x1b" not in text, "no colour codes or cursor moves in a log file"
    lines = re.findall(r"^\S+ segments: (\d+)/12 \([\d.]+%\) failed 0, [\d.]+ img/s, elapsed \S+, ETA \S+$", text, re.M)
    counts = [int(n) for n in lines]
    assert len(counts) >= 4 and counts == sorted(counts) and counts[-1] == 12, text
    (stage,) = cache.glob("*/segments/*")
    assert any(str(stage) in line for line in text.splitlines()), "the output path must stay on one line"


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_keeps_finished_parts_and_rerun_resumes(tmp_path, signum, code, capsys):
    from clips4.cli import main

    root = box_images(tmp_path / "imgs", 16)
    cache = tmp_path / "cache"
    p = subprocess.Popen(_segments_cmd(cache, root, "--batch-size", "1", "-q"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        parts = lambda: list(cache.glob("*/segments/*/parts/*.parquet"))  # noqa: E731
        _wait_for(lambda: len(parts()) >= 3, what="three parts")
        # the run is paused the moment three parts are seen, so it is still going when the signal comes (it is
        # delivered on resuming): however busy the machine, the run cannot finish first
        p.send_signal(signal.SIGSTOP)
        assert len(parts()) < 16 and p.poll() is None, "the run must still be going when the signal is sent"
        p.send_signal(signum)
        p.send_signal(signal.SIGCONT)
        assert p.wait(timeout=60) == code
        err = p.stderr.read()
        assert "interrupted" in err and "Traceback" not in err
    finally:
        p.kill()
        p.wait()
    (stage,) = cache.glob("*/segments/*")
    kept = len(list((stage / "parts").glob("*.parquet")))
    assert 3 <= kept < 16 and not (stage / "index.parquet").exists()
    capsys.readouterr()
    assert main(_segments_cmd(cache, root, "-q")[3:]) == 0  # the rerun, in this process (no second start-up)
    assert f"{kept} already done" in " ".join(capsys.readouterr().err.split())
    assert len(StageReader(str(stage))) == 16


def test_rerun_and_commit_open_only_the_part_records_the_index_does_not_name(tmp_path, image_folder, toy_stage,
                                                                               monkeypatch):
    """At 100k images a stage has thousands of part records: a rerun reads the index, not every record."""
    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    before = pq.read_table(Path(run.url, "index.parquet"))
    opened = []
    real = pq.read_table

    def counting(src, *a, **k):
        opened.append(getattr(src, "path", getattr(src, "name", str(src))))
        return real(src, *a, **k)

    monkeypatch.setattr(pq, "read_table", counting)
    os.utime(image_folder / "img0.png", (1, 1))  # a changed file: one new part, one commit
    again = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert again.processed == 1
    part_reads = [o for o in opened if "/parts/" in str(o)]
    assert len(part_reads) <= 2, part_reads  # the new part's record (at start none, at commit one)
    after = pq.read_table(Path(run.url, "index.parquet"))
    assert after["image_id"].to_pylist() == before["image_id"].to_pylist()
    new = dict(zip(after["image_id"].to_pylist(), after["part"].to_pylist()))
    old = dict(zip(before["image_id"].to_pylist(), before["part"].to_pylist()))
    assert [i for i in new if new[i] != old[i]] == ["img0"]
