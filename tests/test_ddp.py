"""DDP on CPU: ``torchrun --nproc_per_node 2 -m clips4.cli train ...`` (gloo) trains; rank 0 alone writes outputs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import metrics, tiny_world, train_args

from clips4.trainer.checkpoint import load_checkpoint

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20 s for torchrun on 2 busy cores (plus the shared world build when run alone)
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_torchrun_two_processes_on_cpu(tmp_path_factory, tmp_path):
    world = tiny_world(tmp_path_factory)
    out = tmp_path / "ddp"
    args = train_args(world, out, "--iterations", "2", sets=("train.device=cpu",))[1:]  # drop the "train" verb
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "clips4.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ck = load_checkpoint(out / "final.pt")
    assert ck["step"] == 2
    assert not any(k.startswith("module.") for k in ck["model"])  # the unwrapped model is saved
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1], "rank 0 alone logs (one line per step)"
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in rows)
    assert proc.stderr.count("finished at step 2") == 1  # only rank 0 reports
    assert not list(out.glob(".*.tmp-*"))
