"""``benchmarks/gpu.py --dry-run``: every GPU path of the benchmark (CLIP stage, trainer with the real loader, FAISS
and prototype-search equality, a DDP step after the SyncBatchNorm conversion) runs on the CPU, so the script a GPU
machine runs cannot rot where there is none."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_dry_run_exercises_every_path(tmp_path, capsys, monkeypatch):
    # in this process (its main(argv), as `python benchmarks/gpu.py --dry-run` runs it): no second torch start-up
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # the DDP step's single-rank group, on any free port; both
    monkeypatch.setenv("MASTER_PORT", "0")  # variables are put back afterwards for the tests after this one
    import gpu

    code = gpu.main(["--dry-run", "--work", str(tmp_path / "work")])
    table = capsys.readouterr().out
    sys.modules.pop("gpu", None)
    assert code == 0, table
    for row in ("CLIP stage, fp32", "trainer, AMP off, real loader", "FAISS", "prototype search on cpu vs CPU",
                "one DDP step with SyncBatchNorm"):
        assert row in table, table
    assert "DIFFERENT" not in table and table.count("| equal |") == 2
