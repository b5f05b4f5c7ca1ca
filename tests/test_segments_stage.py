"""The segments stage end to end: CLI, rerun skips, kill -9 then resume equals an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import box_images

from clips4.pipeline.cache import StageReader, list_stage_outputs
from clips4.cli import main


def _cli(cache, root, *extra):
    return ["precompute", "segments", "--dataset", "folder", "--root", str(root), "--cache", str(cache),
            "--executor", "local", "--quiet", *extra]


def test_cli_runs_then_nothing_left_and_cache_ls(tmp_path, capsys):
    root = box_images(tmp_path / "imgs", 4)
    assert main(_cli(tmp_path / "cache", root)) == 0
    assert main(_cli(tmp_path / "cache", root)) == 0
    err = capsys.readouterr().err
    assert "nothing left to do" in err
    (out,) = list_stage_outputs(str(tmp_path / "cache"))
    assert out["state"] == "done" and out["images"] == 4
    r = StageReader(out["url"])
    labels = r.get("im000", "labels")
    assert labels.shape == (72, 96) and 1 <= labels.max() + 1 <= 48
    assert main(["cache", "ls", "--cache", str(tmp_path / "cache")]) == 0
    assert "segments" in capsys.readouterr().out


def test_bad_inputs_recorded_and_exit_status(tmp_path, capsys):
    root = box_images(tmp_path / "imgs", 2)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    Image.new("RGB", (1, 1), (3, 4, 5)).save(root / "tiny.png")
    Image.new("CMYK", (40, 30), (0, 50, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(root / "deep.png")
    assert main(_cli(tmp_path / "cache", root)) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 image(s) failed" in err
    assert main(_cli(tmp_path / "cache2", root, "--max-failures", "1")) == 0
    (out,) = list_stage_outputs(str(tmp_path / "cache"))
    assert out["images"] == 5 and out["failed"] == 1


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    root = box_images(tmp_path / "imgs", 24)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "clips4.cli", *_cli(tmp_path / "killed", root, "--batch-size", "1")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    parts = []
    while time.time() < deadline:
        parts = list((tmp_path / "killed").glob("*/segments/*/parts/*.parquet"))
        if len(parts) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(parts) < 24, "the run was not killed in the middle"
    assert not list((tmp_path / "killed").glob("*/segments/*/index.parquet")), "a killed run must not look done"
    assert main(_cli(tmp_path / "killed", root)) == 0
    assert main(_cli(tmp_path / "clean", root)) == 0
    (a,) = list_stage_outputs(str(tmp_path / "killed"))
    (b,) = list_stage_outputs(str(tmp_path / "clean"))
    ra, rb = StageReader(a["url"]), StageReader(b["url"])
    assert ra.image_ids == rb.image_ids and len(ra) == 24
    for image_id in ra.image_ids:
        for field in ("contours", "ucm", "labels"):
            np.testing.assert_array_equal(ra.get(image_id, field), rb.get(image_id, field))


@pytest.mark.ray
@pytest.mark.skipif(not os.environ.get("CLIPS4_SLOW_TESTS"), reason="a private Ray start in this process, ~20 s more: "
                    "tests/test_ray_cluster.py checks that a Ray run writes the same index and arrays as a local run; "
                    "CLIPS4_SLOW_TESTS=1 pytest tests/test_segments_stage.py")
def test_ray_workers_write_the_same_cache_as_local(tmp_path):
    root = box_images(tmp_path / "imgs", 5)
    ray_args = ["precompute", "segments", "--dataset", "folder", "--root", str(root), "--cache", str(tmp_path / "ray"),
                "--executor", "ray", "--num-workers", "2", "--batch-size", "2", "--quiet"]
    try:
        assert main(ray_args) == 0
    finally:
        import ray

        ray.shutdown()
    assert main(_cli(tmp_path / "local", root)) == 0
    (a,) = list_stage_outputs(str(tmp_path / "ray"))
    (b,) = list_stage_outputs(str(tmp_path / "local"))
    ra, rb = StageReader(a["url"]), StageReader(b["url"])
    assert len({p for p in ra.index["part"].to_pylist()}) == 3  # 5 images in batches of 2
    for image_id in rb.image_ids:
        np.testing.assert_array_equal(ra.get(image_id, "labels"), rb.get(image_id, "labels"))


def test_evaluate_boundaries_reuses_the_segments_cache(tmp_path, capsys):
    from conftest import shared_path

    bsds = shared_path("BSDS500")
    args = ["evaluate", "boundaries", "--root", str(bsds), "--limit", "1", "--thresholds", "1", "--workers", "1",
            "--cache", str(tmp_path / "cache"), "--executor", "local", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    import json

    res = json.loads((tmp_path / "out" / "boundaries.json").read_text())
    assert 0.3 < res["contours"]["ODS"]["f"] <= 1 and 0 < res["ucm"]["covering"]["ODS"] <= 1
    assert (tmp_path / "out" / "boundaries_pr.png").exists()
    assert main(args) == 0
    assert "nothing left to do" in capsys.readouterr().err
