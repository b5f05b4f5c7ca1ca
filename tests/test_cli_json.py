"""Cron-style runs: output to files, --json on stdout parses, the human log keeps paths whole."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image


def test_json_summary_on_stdout_and_plain_log(tmp_path):
    root = tmp_path / ("a-long-folder-name-" * 6) / "imgs"
    root.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(root / f"{i}.png")
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "clips4.cli", "precompute", "segments", "--dataset", "folder", "--root", str(root),
           "--cache", str(cache), "--executor", "local", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # stdout is exactly one JSON document
    assert doc["status"] == "ok" and doc["processed"] == 3 and doc["failed"] == [] and doc["fingerprint"]
    assert str(cache) in doc["url"]
    assert doc["url"] in out.stderr.replace("\n", " ")  # and whole on one line of the human log:
    assert any(doc["url"] in line for line in out.stderr.splitlines())
    assert "\x1b[" not in out.stderr  # no colour codes in a file
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["processed"] == 0
