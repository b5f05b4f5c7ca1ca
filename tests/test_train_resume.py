"""Resuming training equals not stopping: a run stopped at step 3 (``max_steps``, or ``kill -9`` of
``clips4 train``) and resumed logs the same losses for steps 3..5 as an uninterrupted 6-step run, and ends
with the same weights."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import load_cfg, metrics, tiny_world, train_args

from clips4.trainer.checkpoint import load_checkpoint
from clips4.trainer.train import train

KEYS = ("L_t", "L_e", "L_s", "L_u", "avgsim", "total")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def _losses(rows):
    return [(r["step"], *(r[k] for k in KEYS)) for r in rows]


def _same_weights(a, b):
    ka, kb = load_checkpoint(a), load_checkpoint(b)
    assert ka["step"] == kb["step"]
    for name, t in ka["model"].items():
        assert torch.equal(t, kb["model"][name]), name
    assert torch.equal(ka["prototypes"]["unknown"], kb["prototypes"]["unknown"])


@pytest.mark.parametrize("workers,resumed_with", [(0, 0), (2, 2), (2, 0)])
def test_resume_equals_uninterrupted(world, tmp_path, workers, resumed_with):
    """(2, 0): a run killed for its loader's memory is resumed with fewer workers (and another checkpoint
    interval): the same run, since batches and augmentation seeds are functions of (seed, step) alone."""
    sets = (f"train.num_workers={workers}",)
    full = train(load_cfg(world, tmp_path / "full", *sets), show_progress=False)
    assert full.stopped == "finished" and [r["step"] for r in full.losses] == list(range(6))

    part = train(load_cfg(world, tmp_path / "part", *sets), max_steps=3, show_progress=False)
    assert part.stopped == "max_steps" and part.step == 3
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 3
    later = (f"train.num_workers={resumed_with}",) + (("train.checkpoint_every=2",) if resumed_with != workers else ())
    rest = train(load_cfg(world, tmp_path / "part", *later), resume=True, show_progress=False)
    assert rest.stopped == "finished" and [r["step"] for r in rest.losses] == [3, 4, 5]

    # bit-identical on CPU: same batches and augmentation seeds (StepSampler), RNG + memory bank + BN
    # statistics + optimiser momentum restored from the checkpoint
    assert _losses(part.losses) == _losses(full.losses[:3])
    assert _losses(rest.losses) == _losses(full.losses[3:])
    assert _losses(metrics(tmp_path / "part")) == _losses(metrics(tmp_path / "full"))
    _same_weights(tmp_path / "part" / "final.pt", tmp_path / "full" / "final.pt")


def test_kill_9_then_resume_equals_uninterrupted(world, tmp_path):
    """``kill -9`` the CLI once ``last.pt`` exists (step 3 of 6), then ``clips4 train --resume`` finishes it."""
    from clips4.cli import main

    sets = ("train.num_workers=2",)
    full = tmp_path / "full"
    assert main(train_args(world, full, sets=sets)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "clips4.cli", *train_args(world, killed, sets=sets)]
    # the DataLoader workers are in the same session: killpg takes them down too, as a real kill would
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    assert (killed / "last.pt").exists(), f"never wrote last.pt: {err[-2000:]}"
    assert not (killed / "final.pt").exists(), "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(killed / "last.pt")["step"]
    assert stopped_at == 3

    assert main(train_args(world, killed, "--resume", sets=sets)) == 0
    assert (killed / "final.pt").is_file()
    got, want = metrics(killed), metrics(full)
    # steps logged after the checkpoint by the killed process were dropped and redone by the resumed one
    assert [r["step"] for r in got] == list(range(6))
    assert _losses(got) == _losses(want)
    _same_weights(killed / "final.pt", full / "final.pt")
