"""``clips4 train`` on a tiny synthetic world: outputs, rerun, refused checkpoints, NaN stop, missing weights.

The world (8 train images, 96x128) and its caches (segments, clip_features with the synthetic teacher,
prototypes) are built once per test session through the CLI (``--executor local``) and shared by
``test_train_resume.py`` and ``test_ddp.py`` (they import ``tiny_world`` / ``train_args`` from here).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from clips4.cli import main
from clips4.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages.yaml"
#: the overrides every test run uses: 6 tiny steps, checkpoint every 3, two images (four views) per step, and no
#: class calibration (a second pass over the images after training, about as long as the 6 steps; the tests of the
#: calibration ask for it with CALIBRATED)
TINY = ["train.iterations=6", "train.num_workers=0", "train.checkpoint_every=3", "train.batch_size=2",
        "train.crop_size=64", "train.calibration=none"]
#: the calibration at its default, after TINY
CALIBRATED = ("train.calibration=band",)


def _build_world(base: Path) -> Path:
    from clips4.synthetic import build_world

    cfg = build_world(base, 8, 4, stages_file=STAGES).configs[0]
    (base / "READY").write_text("ok")
    return cfg


def tiny_world(tmp_path_factory) -> Path:
    """Path of the world's YAML config; built on first use in this session (shared across test modules)."""
    base = tmp_path_factory.getbasetemp() / "train-world"
    if not (base / "READY").exists():
        base.mkdir(exist_ok=True)
        _build_world(base)
    return base / "synthetic.yaml"


def train_args(cfg: Path, out: Path, *extra: str, sets: tuple[str, ...] = ()) -> list[str]:
    args = ["train", "--stages", str(STAGES), "--config", str(cfg), "--out", str(out), "--quiet"]
    for s in (*TINY, *sets):
        args += ["--set", s]
    return args + list(extra)


def load_cfg(cfg: Path, out: Path, *sets: str):
    return load_config(STAGES, [cfg], [*TINY, f"train.out={json.dumps(str(out))}", *sets])


def stderr(capsys) -> tuple[str, str]:
    """(words joined by single spaces, lines joined with nothing): rich wraps long lines, even inside paths."""
    err = capsys.readouterr().err
    return " ".join(err.split()), "".join(ln.strip() for ln in err.splitlines())


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_world(tmp_path_factory)


# ------------------------------------------------------------------------------------------------ tests
def test_train_writes_outputs_then_nothing_left(world, tmp_path, capsys):
    from clips4.pipeline.stage import code_version
    from clips4.trainer.checkpoint import load_checkpoint

    out = tmp_path / "run"
    assert main(train_args(world, out)) == 0
    for name in ("last.pt", "final.pt", "metrics.jsonl", "config.json", "meta.json", "index.parquet"):
        assert (out / name).is_file(), name
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(6))
    for r in rows:
        for k in ("L_t", "L_e", "L_s", "L_u", "avgsim", "total", "data_s", "step_s", "lr"):
            assert k in r and isinstance(r[k], float), k
        assert r["total"] == pytest.approx(r["L_t"] + r["L_e"] + r["L_s"] + r["L_u"], rel=1e-5)
        assert 0 <= r["data_s"] <= r["step_s"]
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[-1]["lr"] < rows[0]["lr"]  # poly decay

    conf = json.loads((out / "config.json").read_text())
    p = conf["config"]["stages"]["train"]["params"]
    assert (p["iterations"], p["batch_size"], p["backbone"], p["head_dim"]) == (6, 2, "tiny", 64)
    assert p["out"] == str(out)
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", conf["git"]) and conf["git"] == code_version()
    assert set(conf["deps"]) == {"segments", "clip_features", "prototypes"}
    assert conf["classes"] and conf["signature"]["head_dim"] == 64

    ck = load_checkpoint(out / "final.pt")
    assert ck["step"] == 6 and ck["git"] == conf["git"]
    assert json.loads(ck["config"])["stages"]["train"]["params"]["iterations"] == 6
    assert set(ck["rng"]) >= {"torch", "numpy", "python"}

    capsys.readouterr()
    before = (out / "final.pt").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert main(train_args(world, out)) == 0
    assert "nothing left to do" in capsys.readouterr().err
    assert (out / "final.pt").stat().st_mtime_ns == before and len(metrics(out)) == 6
    assert time.perf_counter() - t0 < 10


def test_a_finished_run_of_another_configuration_is_not_nothing_left_to_do(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(world, out)) == 0
    before = (out / "final.pt").stat().st_mtime_ns
    capsys.readouterr()
    # keys that only change how the run is carried out: the same run, nothing left to do
    assert main(train_args(world, out, sets=("train.checkpoint_every=2", "train.log_every=5"))) == 0
    assert "nothing left to do" in capsys.readouterr().err
    # a key that changes the model: named with both values, and the finished run is left as it was
    assert main(train_args(world, out, sets=("train.w_s=0.5",))) == 2
    words, _ = stderr(capsys)
    assert "another configuration" in words and "train.w_s: 1.0 there, 0.5 here" in words
    assert "--restart" in words and "nothing left to do" not in words
    assert (out / "final.pt").stat().st_mtime_ns == before


def test_unfinished_run_needs_resume_or_restart(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(world, out, "--max-steps", "3")) == 0
    assert (out / "last.pt").is_file() and not (out / "final.pt").exists()
    capsys.readouterr()
    assert main(train_args(world, out)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--restart" in err


def test_restart_stopped_early_does_not_leave_the_old_final(world, tmp_path, capsys):
    """--restart ignores the old run; if it stops early, the previous run's final.pt must not make it 'done'."""
    out = tmp_path / "run"
    assert main(train_args(world, out)) == 0
    assert main(train_args(world, out, "--restart", "--max-steps", "3")) == 0
    assert not (out / "final.pt").exists() and not (out / "index.parquet").exists()
    capsys.readouterr()
    assert main(train_args(world, out, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().err
    assert (out / "final.pt").is_file() and [r["step"] for r in metrics(out)] == list(range(6))


@pytest.mark.parametrize("change", [["train.head_dim=32"], ["train.backbone=resnet18"]], ids=["head_dim", "backbone"])
def test_checkpoint_of_another_model_is_refused(world, tmp_path, capsys, change):
    out = tmp_path / "run"
    assert main(train_args(world, out, "--max-steps", "3")) == 0
    capsys.readouterr()
    assert main(train_args(world, out, "--resume", sets=tuple(change))) == 2
    err, flat = stderr(capsys)
    assert "last.pt" in flat and "belongs to another model" in err
    key, value = change[0].removeprefix("train.").split("=")
    assert re.search(rf"{key}: checkpoint '?\w+'? vs this run '?{value}'?", err), err
    assert (out / "last.pt").is_file()  # refused, not overwritten


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_garbage_and_unsafe_checkpoints_are_refused(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(world, out, "--max-steps", "3")) == 0
    (out / "last.pt").write_bytes(b"this is not a checkpoint")
    capsys.readouterr()
    assert main(train_args(world, out, "--resume")) == 2
    err, flat = stderr(capsys)
    assert "last.pt" in flat and "weights_only=True" in flat

    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    torch.save({"format": "clips4-checkpoint-v1", "model": evil}, out / "last.pt")
    assert main(train_args(world, out, "--resume")) == 2
    err, _ = stderr(capsys)
    assert "cannot be loaded safely" in err
    assert not evil.marker.exists(), "unpickling ran code"

    torch.save({"step": 3}, out / "last.pt")  # loads safely but is not ours
    assert main(train_args(world, out, "--resume")) == 2
    assert "is not a clips4 checkpoint" in stderr(capsys)[0]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    from clips4.trainer import losses
    from clips4.trainer.checkpoint import load_checkpoint
    from clips4.trainer.train import TrainingError, train

    real = losses.CLIPS4Loss.forward
    calls = []

    def poisoned(self, *a, **kw):
        total, parts = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 5:  # step 4 (0-based); last.pt was written after step 2 (checkpoint_every=3)
            parts = {**parts, "L_s": float("nan"), "total": float("nan")}
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(losses.CLIPS4Loss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as exc:
        train(load_cfg(world, out), show_progress=False)
    msg = str(exc.value)
    assert "not finite at step 4" in msg and "'L_s': nan" in msg and "'L_t'" in msg
    assert str(out / "last.pt") in msg
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (out / "final.pt").exists()
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]  # the NaN step is not logged as a result

    monkeypatch.setattr(losses.CLIPS4Loss, "forward", real)
    res = train(load_cfg(world, out), resume=True, show_progress=False)  # the kept checkpoint continues
    assert res.stopped == "finished" and res.step == 6


def test_missing_backbone_weights_fail_fast(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere" / "resnet18.pth"
    t0 = time.perf_counter()
    assert main(train_args(world, out, "--backbone", "resnet18", "--backbone-weights", str(missing))) == 2
    err, flat = stderr(capsys)
    assert str(missing) in flat and "--backbone-weights" in err
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()

    # imagenet weights with an empty torch hub cache and no network: names the file, where, and how to provide it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr("clips4.trainer.model._host_reachable", lambda url, timeout=3.0: False)
    assert main(train_args(world, out, "--backbone", "resnet18", "--backbone-weights", "imagenet")) == 2
    err, flat = stderr(capsys)
    assert "ResNet18_Weights.IMAGENET1K_V1" in err and str(tmp_path / "torch-home") in flat
    assert "--backbone-weights PATH" in err and "--backbone-weights random" in err
    assert time.perf_counter() - t0 < 20


def test_log_file_gets_plain_progress_lines_every_log_every_steps(world, tmp_path, capfd):
    """Cron: stderr to a file gets one plain line per log_every steps (losses, rate, ETA), no bar, no colour
    (``capfd``: file descriptor 2 is a file, as under cron)."""
    args = [a for a in train_args(world, tmp_path / "run", sets=("train.log_every=2",)) if a != "--quiet"]
    capfd.readouterr()
    assert main(args) == 0
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train step ")]
    steps = [int(ln.split()[2].split("/")[0]) for ln in lines]
    assert steps and steps == sorted(steps) and all(s % 2 == 0 or s == steps[-1] for s in steps)
    assert all("total=" in ln and "ETA" in ln for ln in lines) and "\x1b[" not in err


def test_second_training_on_the_same_folder_exits_3_and_leaves_the_first_alone(world, tmp_path, capsys):
    """Two ``clips4 train`` on one output folder would interleave metrics.jsonl and overwrite checkpoints: the
    second one exits 3 naming the running one (and gives up after --wait-timeout), the first one finishes."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    args = train_args(world, out, sets=("train.iterations=100000", "train.checkpoint_every=100000"))
    first = subprocess.Popen([sys.executable, "-m", "clips4.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not (out / "metrics.jsonl").exists() or not metrics(out):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() - t0 < 300, "the first run wrote no step"
            time.sleep(0.2)
        capsys.readouterr()
        assert main(train_args(world, out, "--restart")) == 3
        err, _ = stderr(capsys)
        assert f"pid {first.pid}" in err and "--wait" in err
        t1 = time.monotonic()
        assert main(train_args(world, out, "--restart", "--wait", "--wait-timeout", "1")) == 3
        assert 1 <= time.monotonic() - t1 < 30
        assert not (out / "final.pt").exists()  # the second run changed nothing
        steps = [m["step"] for m in metrics(out)]
        assert steps == list(range(len(steps)))  # one writer: no interleaved or restarted lines
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143
    from clips4.pipeline.lock import StageLock

    with StageLock(str(out)) as lock:  # free again once the first run stopped
        assert lock.held


def test_logit_adjustment_measures_the_teacher_marginal_once_and_says_so(world, tmp_path, capsys):
    """train.logit_adjustment > 0: the teacher's class marginal over (at most prior_images) training images' cached
    features adjusts the L_s pseudo-labels, said in one line; the default (0, the paper) measures nothing."""
    args = [a for a in train_args(world, tmp_path / "la", sets=("train.logit_adjustment=1", "train.prior_images=4"))
            if a != "--quiet"]
    assert main(args) == 0
    words, _ = stderr(capsys)
    assert ("L_s pseudo-labels: logit adjustment 1.0, collapse guard 0.0 by the teacher's class marginal over 4 "
            "training images") in words
    assert main([a for a in train_args(world, tmp_path / "plain") if a != "--quiet"]) == 0
    assert "logit adjustment" not in stderr(capsys)[0]


def test_text_distillation_is_trained_and_logged(world, tmp_path, capsys):
    """train.w_x > 0: L_x, against the prototypes stage's class texts, is in every step's metrics and the total."""
    out = tmp_path / "lx"
    assert main(train_args(world, out, sets=("train.w_x=0.5", "train.calibration=none"))) == 0
    for r in metrics(out):
        assert r["L_x"] > 0
        assert r["total"] == pytest.approx(r["L_t"] + r["L_e"] + r["L_s"] + r["L_u"] + 0.5 * r["L_x"], rel=1e-5)
    # class-free prototypes have no class texts: L_x is off, said once, and the run goes on
    assert main(["precompute", "prototypes", "--stages", str(STAGES), "--config", str(world),
                 "--set", "prototypes.classes=null", "--set", "prototypes.invariance_images=0"]) == 0
    args = [a for a in train_args(world, tmp_path / "cf", sets=("train.w_x=1", "prototypes.classes=null",
                                                                          "prototypes.invariance_images=0"))
            if a != "--quiet"]
    assert main(args) == 0
    assert "L_x: off (class-free prototypes" in stderr(capsys)[0]
    assert all("L_x" not in r for r in metrics(tmp_path / "cf"))


def test_class_calibration_is_stored_said_and_never_costs_the_run(world, tmp_path, capsys, monkeypatch):
    """train.calibration: band (the default) stores the class calibration of the evaluated weights in final.pt and
    says what it raised and lowered in one line; none stores nothing; a calibration that fails (an unreadable image, ...) is a
    warning and final.pt is still written and committed, without it."""
    import clips4.trainer.train as tr

    assert load_config(STAGES, None, [], search=False).params("train").calibration == "band"  # the default
    assert main([a for a in train_args(world, tmp_path / "cal", sets=(*CALIBRATED, "train.calibration_images=3"))
                 if a != "--quiet"]) == 0
    cal = torch.load(tmp_path / "cal" / "final.pt", weights_only=True)["calibration"]
    assert cal["n_images"] == 3 and cal["mode"] == "band" and len(cal["bias"]) == len(cal["classes"])
    said = stderr(capsys)[0]
    assert "calibration (band: classes outside 0.85 .. 1/0.85 x the teacher's share moved towards it; 3 training images)" in said
    line = next(ln for ln in said.split("(stored in final.pt)")[:1])
    assert "of the teacher's share," not in line  # shares of pixels, not ratios that explode for a rare class
    assert main(train_args(world, tmp_path / "none", sets=("train.calibration=none",))) == 0
    assert "calibration" not in torch.load(tmp_path / "none" / "final.pt", weights_only=True)

    # a class held at the raise cap (train.calibration_max_margins) is named in a warning and in the record
    import clips4.trainer.calibration as cal_mod

    real = cal_mod.calibrate

    def capped(*a, **k):
        assert k["max_margins"] == 0.5  # the config key reaches the fit
        r = real(*a, **k)
        return {**r, "capped": [r["classes"][0]], "max_bias": 0.01}

    monkeypatch.setattr(cal_mod, "calibrate", capped)
    assert main([a for a in train_args(world, tmp_path / "cap", sets=(*CALIBRATED, "train.calibration_images=3",
                                                                    "train.calibration_max_margins=0.5"))
                 if a != "--quiet"]) == 0
    err = stderr(capsys)[0]
    assert "warning: calibration: " in err and "median margins" in err
    assert torch.load(tmp_path / "cap" / "final.pt", weights_only=True)["calibration"]["capped"]
    monkeypatch.setattr(cal_mod, "calibrate", real)

    def broken(*a, **k):
        raise OSError("image train_0003.png vanished")

    monkeypatch.setattr(tr, "_calibrate", broken)
    assert main([a for a in train_args(world, tmp_path / "broken", sets=CALIBRATED) if a != "--quiet"]) == 0
    assert "class calibration failed (OSError: image train_0003.png vanished)" in stderr(capsys)[0]
    assert "calibration" not in torch.load(tmp_path / "broken" / "final.pt", weights_only=True)
    assert (tmp_path / "broken" / "index.parquet").is_file()
