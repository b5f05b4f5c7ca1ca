"""``benchmarks/gpu.py --dry-run``: every GPU path of the benchmark (CLIP stage, trainer with the real loader, FAISS
and prototype-search equality, a DDP step after the SyncBatchNorm conversion) runs on the CPU, so the script a GPU
machine runs cannot rot where there is none."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_exercises_every_path(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    table = p.stdout
    for row in ("CLIP stage, fp32", "trainer, AMP off, real loader", "FAISS", "prototype search on cpu vs CPU",
                "one DDP step with SyncBatchNorm"):
        assert row in table, table
    assert "DIFFERENT" not in table and table.count("| equal |") == 2
