"""benchmarks/synthetic_world.py --sweep --quick: the sweep's machinery end to end on one tiny world-seed
(its figures are meaningless at this size; the benchmark itself is the 512-image / 3000-iteration run)."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_sweep_quick_prints_every_column_and_the_targets(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import synthetic_world

    code = synthetic_world.main(["--sweep", "--quick", "--iterations", "20", "--worlds", "voronoi-yellows", "--seeds", "0",
                                 "--rows", "defaults", "--row", "tau 1: train.semantic_temperature=1",
                                 "--work", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert code in (0, 1)  # 0 only when the defaults meet the targets
    # --quick's images and the asked iterations honoured by the sweep (--quick alone trains 60)
    assert "16 train / 8 val images" in out and "train.iterations=20" in out
    row = next(line for line in out.splitlines() if line.startswith("voronoi-yellows"))
    assert len(row.split()) >= 14  # teacher, defaults, + prior, uncalibrated and the extra row, each with its worst class
    for key in ("defaults", "defaults + prior matching", "defaults (uncalibrated)", "tau 1", "tau 1 (uncalibrated)"):
        assert any(line.startswith(key) and "min gain" in line for line in out.splitlines()), key
    assert out.count("targets (") == 3
    assert (tmp_path / "w" / "voronoi-yellows-0" / "runs" / "tau_1" / "final.pt").is_file()
    sys.modules.pop("synthetic_world", None)
