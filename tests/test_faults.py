"""Faults that must not get through: an image too large for memory, damaged finished caches, hostile configs,
odd file names, signals under Ray, object-store failures, closed output streams."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clips4.pipeline import stage as stage_mod
from clips4.pipeline.cache import CacheError, StageReader, list_stage_outputs, verify_stage
from test_stage_framework import _cfg, toy_stage  # noqa: F401 - fixture


def _main(capfd, *args, env=None) -> tuple[int, str]:
    """``clips4 ARGS`` in this process (what ``python -m clips4.cli`` runs, without another interpreter start-up)
    with ``env`` added to the environment: (exit code, what it wrote to stderr)."""
    from clips4.cli import main

    capfd.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        code = main(list(args))
    return code, capfd.readouterr().err


# ------------------------------------------------------------------------------ damaged finished caches
def _shard(url: str, field: str = "gray") -> Path:
    """The first shard file (not metadata) of ``field``."""
    files = sorted(p for p in Path(url, "parts").glob(f"*.zarr/{field}/**/*") if p.is_file() and p.name != "zarr.json")
    return files[0]


def _part_of(path: Path) -> str:
    return next(p for p in path.parts if p.endswith(".zarr"))[: -len(".zarr")]


def _images_of_part(url: str, part: str) -> set[str]:
    t = pq.read_table(Path(url, "index.parquet"))
    return {i for i, p in zip(t["image_id"].to_pylist(), t["part"].to_pylist()) if p == part}


def test_truncated_shard_of_a_finished_stage_is_named_and_recomputed(tmp_path, image_folder, toy_stage):
    from test_stage_framework import ToyProcessor

    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    shard = _shard(run.url)
    part = _part_of(shard)
    lost = _images_of_part(run.url, part)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    victim = sorted(lost)[0]
    # the reader names the file, the image and the fix, instead of a bare checksum error
    with pytest.raises(CacheError) as err:
        StageReader(run.url).get(victim, "gray")
    text = str(err.value)
    assert str(shard) in text and victim in text and "clips4 cache verify --repair" in text
    problems = verify_stage(run.url)
    assert [Path(p.file) for p in problems] == [shard] and set(problems[0].images) == lost
    (row,) = list_stage_outputs(str(tmp_path / "cache"))
    assert row["state"] == "damaged" and row["problems"][0]["file"] == str(shard)
    # a rerun is not "nothing left to do": the damaged part's images are computed again
    ToyProcessor.calls = []
    again = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert again.processed == len(lost) and set(ToyProcessor.calls) == lost
    assert verify_stage(run.url, checksums=True) == []
    r = StageReader(run.url)
    assert len(r) == 6 and r.get(victim, "gray").shape == np.asarray(Image.open(image_folder / f"{victim}.png")).shape[:2]


def test_truncated_table_names_its_file_and_checksums_catch_same_size_damage(tmp_path, image_folder, toy_stage):
    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    table = sorted(Path(run.url, "tables", "segs").glob("*.parquet"))[0]
    good = table.read_bytes()
    table.write_bytes(good[:40])
    with pytest.raises(CacheError, match="damaged cache file .*" + table.name):
        list(StageReader(run.url).iter_table("segs"))
    # same size, other bytes: only the checksums see it
    table.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:30]) + good[30:])
    assert verify_stage(run.url) == []
    (p,) = verify_stage(run.url, checksums=True)
    assert Path(p.file) == table and "sha256" in p.reason


def test_cache_verify_cli_reports_and_repairs(tmp_path, image_folder, toy_stage, capfd):
    from test_stage_framework import TOY

    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    shard = _shard(run.url, "feat")
    shard.write_bytes(b"")
    cache = str(tmp_path / "cache")
    args = ["cache", "verify", "--cache", cache, *sum((["--set", s] for s in TOY), [])]
    code, err = _main(capfd, *args)
    assert code == 1 and str(shard) in err and "--repair" in err and "Traceback" not in err
    code, err = _main(capfd, *args, "--repair", "--set", "ray.executor=local")
    assert code == 0, err
    assert verify_stage(run.url, checksums=True) == [] and len(StageReader(run.url)) == 6
    assert _main(capfd, *args, "--checksums")[0] == 0


# ------------------------------------------------------------------------------------------ file names
def test_a_file_name_that_is_not_utf8_blocks_nothing_and_is_stored_losslessly(tmp_path, toy_stage, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "good.png")
    bad_name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(os.fsencode(root) + b"/caf\xe9.png")
    (root / "bro\nken.png").write_bytes(b"not an image")
    cfg = _cfg(tmp_path, root)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert run.processed == 3 and [i for i, _ in run.failed] == ["bro\nken"]
    r = StageReader(run.url)
    bad_id = bad_name[: -len(".png")]
    assert sorted(r.image_ids) == sorted(["good", bad_id])
    assert r.record(bad_id).path == str(root / bad_name) and r.get(bad_id, "gray").shape == (16, 20)
    # table rows carry the stored form; the reader takes either
    table_ids = set(r.read_table("segs", columns=["image_id"])["image_id"].to_pylist())
    assert len(table_ids) == 2 and all(r.row(i)["image_id"] in ("good", bad_id) for i in table_ids)
    # a rerun finds both finished (the stored id reads back as the very same name)
    assert stage_mod.run_stage(cfg, "toy", show_progress=False).processed == 0
    capsys.readouterr()
    stage_mod.print_summary(run, max_failures=5)
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "failed" in ln and "bro" in ln]
    assert len(line) == 1 and "bro\\nken" in line[0] and "not an image" in line[0]


# ------------------------------------------------------------------------------------------ hostile config
BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def test_nested_aliases_and_oversized_configs_are_refused_at_once(tmp_path):
    from clips4.pipeline.config import ConfigError, load_config

    evil = tmp_path / "evil.yaml"
    evil.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 1500
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        load_config(None, [evil], search=False)
    assert time.perf_counter() - t0 < 1.0
    (tmp_path / "self.yaml").write_text("a: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_config(None, [tmp_path / "self.yaml"], search=False)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="above the limit"):
        load_config(None, [big], search=False)
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(None, None, ["segments.detector_params=" + "{" + BILLION_LAUGHS.replace("\n", ", ") + "}"],
                    search=False)
    # anchors of ordinary size still work
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"dataset: {{root: &r {tmp_path}}}\ncache_root: *r\n")
    assert load_config(None, [ok], search=False).cache_root == str(tmp_path)


def test_config_that_is_a_folder_or_empty_says_so_and_cli_exits_2(tmp_path, capfd):
    evil = tmp_path / "evil.yaml"
    evil.write_text(BILLION_LAUGHS)
    for cfg, said in ((tmp_path, "is a folder"), ("/dev/null", "is empty"), (evil, "aliases expand")):
        t0 = time.perf_counter()
        code, err = _main(capfd, "cache", "ls", "--config", str(cfg), "--cache", str(tmp_path / "c"))
        assert code == 2 and said in err and "Traceback" not in err, err
        assert time.perf_counter() - t0 < 10


def test_unloadable_clip_checkpoint_exits_2_naming_the_file(tmp_path, image_folder, capfd):
    import torch

    from clips4.cli import main

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, evil)
    capfd.readouterr()
    # in this process (its file descriptors are captured: a shell command the pickle ran would show there too)
    code = main(["precompute", "clip-features", "--dataset", "folder", "--root", str(image_folder), "--cache",
                 str(tmp_path / "c"), "--executor", "local", "--clip-checkpoint", str(evil), "--set",
                 "clip_features.segment_source=kmeans"])
    out, err = capfd.readouterr()
    assert code == 2 and "evil.pt" in err and "owned" not in out + err, err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ memory budget
def _fake_big_jpeg(path: Path, w: int = 12000, h: int = 9000) -> Path:
    """A tiny JPEG whose header says ``w`` x ``h`` (108 MP): what the budget sees before any decoding."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            assert im.size == (w, h)
    return path


def _big_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    _fake_big_jpeg(root / "big.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "small.png")
    return root


def test_an_image_above_the_memory_budget_is_a_failed_row_naming_image_and_budget(tmp_path):
    from clips4.pipeline.config import load_config
    from clips4.pipeline.limits import working_set

    root = _big_folder(tmp_path)
    cfg = load_config(None, None, [f"cache_root={tmp_path / 'cache'}", "dataset.kind=folder", f"dataset.root={root}",
                                   "ray.executor=local", "ray.memory_budget_mb=2048", "segments.detector=classical"],
                      search=False)
    run = stage_mod.run_stage(cfg, "segments", show_progress=False)
    assert run.processed == 2 and [i for i, _ in run.failed] == ["big"]
    msg = run.failed[0][1]
    assert str(root / "big.jpg") in msg and "12000x9000" in msg and "memory budget of 2.0 GiB" in msg
    assert working_set("segments", 9000, 12000) > 2 << 30
    assert len(StageReader(run.url)) == 1


def test_default_budget_follows_ulimit_v_and_the_run_is_not_killed(tmp_path):
    import resource

    root = _big_folder(tmp_path)

    def cap():  # 8 GiB of address space, as `ulimit -v 8388608`
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    p = subprocess.run([sys.executable, "-m", "clips4.cli", "precompute", "segments", "--dataset", "folder", "--root",
                        str(root), "--cache", str(tmp_path / "cache"), "--executor", "local", "--set",
                        "segments.detector=classical", "--max-failures", "1"],
                       capture_output=True, text=True, timeout=120, preexec_fn=cap)
    assert p.returncode == 0, p.stderr
    assert "big" in p.stderr and "memory budget of" in p.stderr and "Traceback" not in p.stderr
    assert "DecompressionBombWarning" not in p.stderr


# ------------------------------------------------------------------------------------------ object storage
@pytest.mark.slow
def test_missing_bucket_is_named_and_never_created(tmp_path, image_folder, capfd):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3server import S3Server

    import boto3

    with S3Server() as srv:
        # one attempt per request (botocore's default retries a refused connection for ~10 s): the message is the same
        env = {**srv.env, "AWS_DEFAULT_REGION": "eu-west-1", "AWS_MAX_ATTEMPTS": "1"}
        for args in (["cache", "ls", "--cache", "s3://nobucket/cache"],
                     ["precompute", "segments", "--dataset", "folder", "--root", str(image_folder), "--cache",
                      "s3://nobucket/cache", "--executor", "local", "--set", "segments.detector=classical"]):
            code, err = _main(capfd, *args, env=env)
            assert code == 2, err
            assert "bucket 'nobucket' does not exist" in err and "Traceback" not in err
        client = boto3.client("s3", endpoint_url=srv.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        assert client.list_buckets()["Buckets"] == []
    # the store gone altogether: one line naming it
    code, err = _main(capfd, "cache", "ls", "--cache", "s3://nobucket/cache", env=env)
    assert code == 2 and "cannot reach the object store" in err and "Traceback" not in err


def test_lock_heartbeat_survives_a_store_that_went_away(monkeypatch):
    import threading

    from clips4.pipeline.lock import StageLock

    class EndpointConnectionError(Exception):  # botocore's: not an OSError
        pass

    escaped = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    lock = StageLock("memory://bucket/stage", heartbeat_s=0.02)
    with lock:
        assert not lock.exclusive and lock._beat is not None

        def gone(*a, **k):
            raise EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:9/"')

        monkeypatch.setattr(lock, "_write_remote", gone)
        monkeypatch.setattr(lock, "_read_remote", gone)
        time.sleep(0.2)
        assert lock._beat.is_alive() and "EndpointConnectionError" in (lock.beat_error or "")
    assert escaped == [] and not lock._beat.is_alive()


# ------------------------------------------------------------------------------------------ signals under Ray
@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_under_ray_exits_143_with_the_message_and_keeps_parts(tmp_path):
    import signal

    from conftest import box_images

    root = box_images(tmp_path / "imgs", 40)
    cache = tmp_path / "cache"
    ray_tmp = Path("/tmp") / f"c4ray-{os.getpid()}"
    p = subprocess.Popen([sys.executable, "-m", "clips4.cli", "precompute", "segments", "--dataset", "folder", "--root",
                          str(root), "--cache", str(cache), "--executor", "ray", "--num-workers", "2", "--batch-size", "1", "-q",
                          "--set", "segments.detector=classical", "--set", f"ray.temp_dir={ray_tmp}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import shutil

    try:
        try:
            deadline = time.time() + 300  # Ray's start-up on a loaded machine can take minutes
            while not list(cache.glob("*/segments/*/parts/*.parquet")) and time.time() < deadline and p.poll() is None:
                time.sleep(0.05)
            assert p.poll() is None, p.stderr.read()
            assert list(cache.glob("*/segments/*/parts/*.parquet")), "no part written before the deadline"
            p.send_signal(signal.SIGTERM)
            code = p.wait(timeout=60)
            err = p.stderr.read()
        finally:
            p.kill()
            p.wait()
        assert code == 143, err
        assert "interrupted by SIGTERM" in err and "SIGTERM received" not in err and "Traceback" not in err
        (stage,) = cache.glob("*/segments/*")
        assert list((stage / "parts").glob("*.parquet")) and not (stage / "index.parquet").exists()
        assert any(ray_tmp.glob("session_*")), "Ray's session files go under ray.temp_dir"
    finally:  # /tmp, not tmp_path (Ray's socket paths must be short): removed whatever the outcome
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ closed output, leftovers
def test_a_reader_that_goes_away_does_not_stop_the_run(tmp_path):
    from conftest import box_images

    root = box_images(tmp_path / "imgs", 8)
    cache = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, "-m", "clips4.cli", "precompute", "segments", "--dataset", "folder", "--root",
                          str(root), "--cache", str(cache), "--executor", "local", "--batch-size", "1", "--set",
                          "segments.detector=classical", "--set", "ray.progress_every_s=0.01"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p.stdout.readline()  # `| head -1`
    p.stdout.close()
    assert p.wait(timeout=120) == 0
    (stage,) = cache.glob("*/segments/*")
    assert len(StageReader(str(stage))) == 8


def test_refused_commands_leave_no_folder_or_lock_behind(tmp_path, image_folder, capfd):
    out = tmp_path / "new" / "run"
    code, err = _main(capfd, "train", "--dataset", "folder", "--root", str(image_folder), "--cache",
                      str(tmp_path / "c"), "--out", str(out), "-q")
    assert code == 2, err
    assert not (tmp_path / "new").exists()
    code, err = _main(capfd, "train-contours", "--root", str(image_folder), "--out", str(out))
    assert code == 2, err
    assert not (tmp_path / "new").exists()
    # a folder that holds work keeps its lock file (waiters lock the same inode)
    from clips4.pipeline.lock import StageLock

    keep = tmp_path / "keep"
    with StageLock(str(keep)):
        (keep / "x").write_text("work")
    assert (keep / ".lock").exists()
    with StageLock(str(keep)):  # and it can be taken again
        pass


def test_damage_found_in_a_dataloader_worker_is_one_line_naming_the_file(monkeypatch):
    import gc

    import torch.utils.data._utils as loader_utils
    from torch.utils.data import DataLoader, Dataset

    from clips4.cli.app import _exit_code, _message

    # the failed loader (held by the traceback) reaps its worker in 0.2 s instead of torch's 5, inside this test
    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)

    class Damaged(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise CacheError("damaged cache file /c/parts/p.zarr/gray (truncated); it holds image a")

    with pytest.raises(CacheError) as err:
        list(DataLoader(Damaged(), num_workers=1))
    message, code = _message(err.value), _exit_code(err.value)
    del err
    gc.collect()
    assert message == "damaged cache file /c/parts/p.zarr/gray (truncated); it holds image a"
    assert code == 1


def test_a_ray_started_by_clips4_uses_ray_temp_dir(tmp_path, monkeypatch):
    import ray

    from clips4.pipeline import runner

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(runner, "_JOINED", None)
    runner.init_ray("local", temp_dir=str(tmp_path / "ray"))
    assert seen["_temp_dir"] == str(tmp_path / "ray") and (tmp_path / "ray").is_dir()
    from clips4.pipeline.config import load_config

    assert load_config(None, None, ["ray.temp_dir=/scratch/ray"], search=False).ray.temp_dir == "/scratch/ray"


def test_one_item_whose_results_cannot_be_stored_does_not_block_its_batch(tmp_path, image_folder, toy_stage,
                                                                          monkeypatch):
    from test_stage_framework import ToyProcessor

    class Unstorable(ToyProcessor):
        def __call__(self, records):
            out = super().__call__(records)
            for rec, res in zip(records, out):
                if rec.image_id == "img3":
                    res.row["note"] = object()  # no Arrow type holds it
            return out

    real = stage_mod.stage_object
    monkeypatch.setattr(stage_mod, "stage_object", lambda run: Unstorable if "ToyProcessor" in run else real(run))
    cfg = _cfg(tmp_path, image_folder, "ray.backoff_s=0.01")
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert run.retries == 0 and [i for i, _ in run.failed] == ["img3"] and "cannot be stored" in run.failed[0][1]
    r = StageReader(run.url)
    assert len(r) == 5 and "img3" not in r.image_ids
    assert stage_mod.run_stage(cfg, "toy", show_progress=False).processed == 0


def test_whole_output_files_are_checked_by_size_and_checksum(tmp_path):
    from clips4.pipeline.cache import commit_files, quarantine_damaged

    out = tmp_path / "proto"
    out.mkdir()
    (out / "prototypes.parquet").write_bytes(b"x" * 100)
    (out / "text.parquet").write_bytes(b"y" * 50)
    commit_files(str(out), ["prototypes.parquet", "text.parquet"], meta={"stage": "prototypes"})
    assert verify_stage(str(out), checksums=True) == []
    (out / "text.parquet").write_bytes(b"y" * 10)
    (p,) = verify_stage(str(out))
    assert p.file.endswith("text.parquet") and "10 bytes, 50 written" in p.reason
    (out / "text.parquet").write_bytes(b"z" * 50)
    (p,) = verify_stage(str(out), checksums=True)
    assert "sha256" in p.reason
    quarantine_damaged(str(out), [p])
    assert not (out / "index.parquet").exists(), "the output is rebuilt whole"


def _waiter(folder, poll_s: float):
    """A thread waiting for the lock of ``folder`` (started), and the list that gets its lock or its exception."""
    import threading

    from clips4.pipeline.lock import StageLock

    got = []

    def wait_for_it():
        try:
            got.append(StageLock(str(folder), wait=True, timeout=20, poll_s=poll_s).acquire())
        except BaseException as exc:  # noqa: BLE001 - reported by the callers' assertions
            got.append(exc)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    return waiter, got


def test_a_waiter_on_a_removed_lock_file_takes_the_lock_at_the_path(tmp_path):
    from clips4.pipeline.lock import StageLock

    folder = tmp_path / "new" / "stage"
    first = StageLock(str(folder)).acquire()
    waiter, got = _waiter(folder, poll_s=0.01)
    time.sleep(0.2)
    first.release()  # nothing else in the folder: the file and the folders go
    waiter.join(30)
    assert got and isinstance(got[0], StageLock) and got[0].held and (folder / ".lock").exists(), got
    with pytest.raises(Exception, match="being written by"):
        StageLock(str(folder)).acquire()
    got[0].release()


def test_waiters_polling_without_pause_survive_the_folders_going_at_any_moment(tmp_path):
    """The releasing holder removes the lock file and the folders it made while a waiter is between its steps
    (making the folders, opening the file): the waiter makes them again and takes the lock, every time."""
    from clips4.pipeline.lock import StageLock

    for i in range(150):
        folder = tmp_path / f"run{i}" / "new" / "stage"
        first = StageLock(str(folder)).acquire()
        waiter, got = _waiter(folder, poll_s=0.0)
        time.sleep(0.001 * (i % 7))
        first.release()
        waiter.join(30)
        assert got and isinstance(got[0], StageLock) and got[0].held, (i, got)
        got[0].release()
