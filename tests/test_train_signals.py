"""Unattended training: SIGTERM/SIGINT write a checkpoint at the current step and exit 143/130, and the
resumed run equals an uninterrupted one; ``--resume --iterations N`` lengthens or shortens a run; a missing
TensorBoard is reported once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import load_cfg, metrics, tiny_world, train_args
from test_train_resume import _losses, _same_weights

from clips4.trainer.checkpoint import load_checkpoint
from clips4.trainer.train import TrainingError, poly_lr, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


# 12 steps and no periodic checkpoint: the only last.pt of the interrupted run is the one the signal writes
LONG = ("train.iterations=12", "train.checkpoint_every=1000")


@pytest.mark.parametrize("signame,group,workers", [("SIGTERM", True, 2), ("SIGINT", False, 0)])
def test_signal_writes_checkpoint_and_resume_equals_uninterrupted(world, tmp_path, signame, group, workers):
    from clips4.cli import main

    sets = (*LONG, f"train.num_workers={workers}")
    full = train(load_cfg(world, tmp_path / "full", *sets), show_progress=False)
    assert full.stopped == "finished"

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "clips4.cli", *train_args(world, run, sets=sets)]
    # start_new_session: killpg reaches the DataLoader workers too, as a cluster scheduler's SIGTERM does
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sig = getattr(signal, signame)
    deadline = time.time() + 180
    log = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            (os.killpg if group else os.kill)(proc.pid, sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    err = err.decode(errors="replace")
    assert proc.returncode == 128 + sig, err[-3000:]
    assert not (run / "final.pt").exists()
    step = load_checkpoint(run / "last.pt")["step"]
    logged = metrics(run)
    # the checkpoint holds every logged step: nothing beyond the current step is lost
    assert [r["step"] for r in logged] == list(range(step))
    assert 2 <= step < 12
    assert "continue with --resume" in " ".join(err.split())

    assert main(train_args(world, run, "--resume", sets=sets)) == 0
    assert _losses(metrics(run)) == _losses(metrics(tmp_path / "full"))
    _same_weights(run / "final.pt", tmp_path / "full" / "final.pt")


def test_resume_with_other_iteration_count(world, tmp_path):
    out = tmp_path / "run"
    base_lr = load_cfg(world, out).params("train").lr
    first = train(load_cfg(world, out), show_progress=False)  # 6 iterations, finished
    assert first.stopped == "finished"

    # a finished run asked for more: refused without --resume, extended with it
    with pytest.raises(TrainingError, match="--resume"):
        train(load_cfg(world, out, "train.iterations=9"), show_progress=False)
    longer = train(load_cfg(world, out, "train.iterations=9"), resume=True, show_progress=False)
    assert longer.stopped == "finished" and [r["step"] for r in longer.losses] == [6, 7, 8]
    # the LR schedule follows the new length from the resume point; recorded in metrics and the checkpoint
    assert [r["lr"] for r in longer.losses] == [poly_lr(base_lr, s, 9, 0.9) for s in (6, 7, 8)]
    assert all(r["iterations"] == 9 for r in longer.losses)
    ck = load_checkpoint(out / "final.pt")
    assert ck["step"] == 9 and ck["iterations"] == 9
    assert json.loads(ck["schedule"]) == [{"from_step": 0, "iterations": 6}, {"from_step": 6, "iterations": 9}]
    assert json.loads((out / "meta.json").read_text())["step"] == 9
    assert train(load_cfg(world, out, "train.iterations=9"), show_progress=False).stopped == "nothing_to_do"
    assert train(load_cfg(world, out, "train.iterations=4"), resume=True, show_progress=False).stopped == "nothing_to_do"

    # an unfinished run shortened: the remaining steps follow the shorter schedule
    short = tmp_path / "short"
    assert train(load_cfg(world, short, "train.iterations=10"), max_steps=3, show_progress=False).step == 3
    rest = train(load_cfg(world, short, "train.iterations=5"), resume=True, show_progress=False)
    assert [r["step"] for r in rest.losses] == [3, 4] and rest.stopped == "finished"
    assert [r["lr"] for r in rest.losses] == [poly_lr(base_lr, s, 5, 0.9) for s in (3, 4)]
    assert load_checkpoint(short / "final.pt")["step"] == 5

    # shortened below the current step: finished where it stands
    past = tmp_path / "past"
    train(load_cfg(world, past, "train.iterations=10"), max_steps=4, show_progress=False)
    end = train(load_cfg(world, past, "train.iterations=2"), resume=True, show_progress=False)
    assert end.stopped == "finished" and end.losses == [] and load_checkpoint(past / "final.pt")["step"] == 4


def test_missing_tensorboard_warns_once(world, tmp_path, monkeypatch, capsys):
    import clips4.trainer.train as tr

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setattr(tr, "_TB_WARNED", False)
    train(load_cfg(world, tmp_path / "a"), max_steps=1, show_progress=False)
    train(load_cfg(world, tmp_path / "b"), max_steps=1, show_progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("TensorBoard is not available") == 1
    assert "metrics.jsonl" in err
    assert (tmp_path / "a" / "metrics.jsonl").is_file() and not (tmp_path / "a" / "tb").exists()
