"""Class-free (known/unknown folds) protocol: the stored Context-59 folds, fold making, and an end-to-end run on a
tiny synthetic world (2 folds x 2 seeds, a few iterations) through ``clips4 evaluate class-free``."""
from __future__ import annotations

import json
import math

import pytest

from clips4 import data as bundled
from clips4.evaluate.classfree import bundled_folds, folds_for, make_folds
from clips4.cli import main


def test_stored_context59_folds_are_a_documented_seeded_partition():
    doc = bundled_folds()
    names = bundled.class_names("context59")
    assert doc["classes"] == names and doc["n_folds"] == 4 and "seed" in doc and doc["procedure"]
    folds = doc["folds"]
    assert sorted(len(f) for f in folds) == [14, 15, 15, 15]
    assert sorted(c for f in folds for c in f) == sorted(names)  # a partition: every class unknown exactly once
    assert folds == make_folds(names, 4, doc["seed"])  # reproducible from the documented procedure
    got, source = folds_for(list(reversed(names)), 4)  # any order of the same 59 classes -> the stored split
    assert got == folds and "context59_folds.json" in source


def test_make_folds_other_class_sets():
    names = ["stripes", "bars", "dots", "checker", "grass", "sky"]
    folds = make_folds(names, 2, seed=0)
    assert [len(f) for f in folds] == [3, 3] and sorted(sum(folds, [])) == sorted(names)
    assert all(f == [c for c in names if c in f] for f in folds)  # list order inside a fold
    assert make_folds(names, 2, seed=0) == folds and make_folds(names, 2, seed=1) != folds
    assert folds_for(names, 2)[0] == folds
    with pytest.raises(ValueError):
        make_folds(names, 7)


def test_class_free_end_to_end_on_synthetic_world(tmp_path, capsys):
    from conftest import make_synthetic

    a = make_synthetic(tmp_path / "world", n_train=4, n_val=3)
    out = tmp_path / "cf"
    code = main(["evaluate", "class-free", *a, "--folds", "2", "--seeds", "2", "--iterations", "2",
                 "--set", "train.batch_size=2", "--set", "prototypes.top_m=4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for col in ("mIoU_u", "mIoU_k", "hIoU", "±"):
        assert col in printed
    res = json.loads((out / "results.json").read_text())
    assert res["folds"]["n_folds"] == 2 and len(res["runs"]) == 4
    assert sorted(sum(res["folds"]["unknown"], [])) == sorted(res["classes"])
    for run in res["runs"]:
        assert run["seed"] in (0, 1) and run["checkpoint"].endswith("final.pt")
        for k in ("miou_unknown", "miou_known", "hiou"):
            assert run[k] is not None and math.isfinite(run[k]), (k, run)
    # the unknown classes really were left out of the known prototypes of that fold's models
    import torch

    for run in res["runs"]:
        ck = torch.load(run["checkpoint"], map_location="cpu", weights_only=False)
        assert set(ck["classes"]).isdisjoint(run["unknown"]) and len(ck["classes"]) == 3
    seeds_of = {}
    for run in res["runs"]:
        seeds_of.setdefault(run["fold"], set()).add(run["checkpoint"])
    assert all(len(v) == 2 for v in seeds_of.values())  # two seeds = two different trainings per fold
    for row in res["summary"]:
        assert row["n_seeds"] == 2
        for k in ("miou_unknown", "miou_known", "hiou"):
            assert math.isfinite(row[k]) and math.isfinite(row[f"{k}_std"]) and row[f"{k}_std"] >= 0
    assert math.isfinite(res["hiou"]) and res["teacher"]["folds"]
    md = (out / "report.md").read_text()
    assert "fold0 mIoU_u" in md and "fold1 hIoU" in md and "±" in md

    # --checkpoints: no training; each checkpoint's stored known classes pick its fold
    cks = [r["checkpoint"] for r in res["runs"] if r["fold"] == 1]
    out2 = tmp_path / "cf2"
    assert main(["evaluate", "class-free", *a, "--folds", "2", "--no-baseline", "--out", str(out2),
                 *sum((["--checkpoints", c] for c in cks), [])]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert [r["fold"] for r in res2["runs"]] == [1, 1] and sorted(r["seed"] for r in res2["runs"]) == [0, 1]
    before = {r["checkpoint"]: r["hiou"] for r in res["runs"]}
    for r in res2["runs"]:
        assert r["hiou"] == pytest.approx(before[r["checkpoint"]])
