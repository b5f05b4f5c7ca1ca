"""DAVIS ground truth is matched to frames by name; ``evaluate davis`` keeps finished sequences."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_safe_paths import make_davis

from clips4.evaluate import davis as dv
from clips4.pipeline.images import load_label_png as load_indexed_png


def _run(root, out, **kw):
    return dv.run_davis(root, out, embedding="color", device="cpu", **kw)


def test_missing_later_annotation_is_reported_and_not_scored(tmp_path):
    root = tmp_path / "davis"
    make_davis(root, {"seq": 6})
    full = _run(root, tmp_path / "full")["sequences"]["seq"]
    assert full["n_frames_scored"] == 4 and full["missing_annotations"] == []

    (root / "Annotations" / "480p" / "seq" / "00002.png").unlink()
    msgs = []
    res = dv.run_davis(root, tmp_path / "out", embedding="color", device="cpu", progress=msgs.append)
    r = res["sequences"]["seq"]
    assert r["missing_annotations"] == ["00002"] and r["n_frames_scored"] == 3
    assert any("00002" in m and "not scored" in m for m in msgs)
    # the other frames keep their own ground truth: their per-frame J equals the complete run's
    j_full = full["objects"][0]["J_per_frame"]
    assert r["objects"][0]["J_per_frame"] == [j_full[0], j_full[2], j_full[3]]
    # rescoring the written masks gives the same numbers
    again = dv.evaluate_results_dir(root, tmp_path / "out")["sequences"]["seq"]
    assert again["J&F"] == pytest.approx(r["J&F"]) and again["missing_annotations"] == ["00002"]


def test_missing_first_annotation_is_an_error(tmp_path):
    """A sequence without its first frame's mask is an error: frame 00001's mask never stands in for it."""
    root = tmp_path / "davis"
    make_davis(root, {"seq": 5})
    (root / "Annotations" / "480p" / "seq" / "00000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"seq: no annotation for its first frame 00000\.jpg"):
        _run(root, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="first frame"):
        dv.evaluate_results_dir(root, tmp_path / "out")


def test_rerun_skips_finished_sequences(tmp_path, monkeypatch):
    root = tmp_path / "davis"
    make_davis(root, {"a": 4, "b": 4})
    out = tmp_path / "out"
    calls = []
    real = dv.propagate_sequence

    def failing_on_b(frames, first, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(frames, first, *a, **kw)

    monkeypatch.setattr(dv, "propagate_sequence", failing_on_b)
    with pytest.raises(RuntimeError):
        _run(root, out)
    saved = json.loads((out / "sequences" / "a.json").read_text())  # written as soon as "a" finished
    assert saved["result"]["n_frames_scored"] == 2
    calls.clear()
    monkeypatch.setattr(dv, "propagate_sequence", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    res = _run(root, out)
    assert len(calls) == 1  # only "b" was propagated again
    assert set(res["sequences"]) == {"a", "b"} and res["sequences"]["a"] == saved["result"]
    # other settings: nothing is reused
    calls.clear()
    _run(root, out, topk=3)
    assert len(calls) == 2
    assert load_indexed_png(out / "b" / "00000.png").max() == 1
