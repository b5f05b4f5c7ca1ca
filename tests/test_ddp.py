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


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SETS = ("train.device=cpu", "train.iterations=8", "train.checkpoint_every=2", "train.calibration=none")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")


def _torchrun(world: Path, out: Path, *extra: str) -> list[str]:
    args = train_args(world, out, *extra, sets=SETS)[1:]  # drop the "train" verb
    return [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "clips4.cli", "train", *args]


def _start_ranks(world: Path, out: Path, *extra: str) -> list[subprocess.Popen]:
    """The two ranks of :func:`_torchrun` started directly with the environment torchrun gives them (no agent:
    one torch start-up less); rank 0's stderr is piped."""
    port = str(_free_port())
    cmd = [sys.executable, "-m", "clips4.cli", *train_args(world, out, *extra, sets=SETS)]
    return [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                             text=True, env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                                             "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
            for r in range(2)]


def _reap(procs: list[subprocess.Popen], timeout: float = 300) -> tuple[int, str]:
    """Wait for the ranks: (the highest exit code, rank 0's stderr); a rank left waiting for its peer is killed."""
    try:
        err = procs[0].communicate(timeout=timeout)[1]
        for p in procs[1:]:
            p.wait(timeout=timeout)
    finally:  # a rank left waiting for its peer would otherwise outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return max(p.returncode for p in procs), err


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted 8-step DDP run (two ranks, checkpoints every 2 steps): checked on its own below and the
    reference a resumed run must equal (~20 s for torchrun on 2 busy cores)."""
    world = tiny_world(tmp_path_factory)
    out = tmp_path_factory.mktemp("ddp") / "ref"
    proc = subprocess.run(_torchrun(world, out), capture_output=True, text=True, timeout=300, env=ENV)
    return out, proc


@pytest.mark.slow
@needs_torchrun
def test_torchrun_two_processes_on_cpu(ddp_run):
    out, proc = ddp_run
    assert proc.returncode == 0, proc.stderr[-4000:]

    ck = load_checkpoint(out / "final.pt")
    assert ck["step"] == 8
    assert not any(k.startswith("module.") for k in ck["model"])  # the unwrapped model is saved
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(8)), "rank 0 alone logs (one line per step)"
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in rows)
    assert proc.stderr.count("finished at step 8") == 1  # only rank 0 reports
    assert not list(out.glob(".*.tmp-*"))


def test_ranks_read_disjoint_shards_of_the_single_process_batch():
    """W ranks of batch B read disjoint shards whose union is exactly one process's batch of B*W, same views."""
    from clips4.trainer.data import StepSampler

    n, bs, world = 37, 3, 2
    single = StepSampler(n, bs * world, seed=5, start=0, total=40)
    ranks = [StepSampler(n, bs, seed=5, start=0, total=40, rank=r, world=world) for r in range(world)]
    for step in range(40):
        shards = [s.batch(step) for s in ranks]
        assert [x for sh in shards for x in sh] == single.batch(step)  # same (image, aug seed) pairs, in order
        assert not set(i for i, _ in shards[0]) & set(i for i, _ in shards[1]) or n < 2 * bs
    # every image is read once per epoch over all ranks together
    seen = [i for step in range(n // (bs * world)) for s in ranks for i, _ in s.batch(step)]
    assert len(seen) == len(set(seen))


@pytest.mark.slow  # two DDP launches besides the reference run
@needs_torchrun
def test_ddp_resume_after_one_rank_is_killed(tmp_path_factory, tmp_path, ddp_run):
    """Kill rank 1 mid-run: the job dies (rank 0 exits with an error instead of waiting for its peer); --resume
    from the last checkpoint continues exactly as an uninterrupted DDP run (same logged losses at every step),
    because every rank's memory bank and RNG state were saved. Both runs start the ranks as torchrun starts them."""
    import time

    world = tiny_world(tmp_path_factory)
    ref, ref_proc = ddp_run
    assert ref_proc.returncode == 0, ref_proc.stderr[-4000:]

    out = tmp_path / "killed"
    procs = _start_ranks(world, out)
    deadline = time.monotonic() + 240
    killed = False
    while procs[1].poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 5 and (out / "last.pt").exists():
            procs[1].kill()
            killed = True
            break
        time.sleep(0.05)
    assert killed, "rank 1 was not found running"
    _, err = _reap(procs, timeout=120)
    # rank 0 fails (exit 1) with one error line naming what the collective reported, no traceback
    assert procs[0].returncode == 1 and "\nerror: " in err and "Traceback" not in err, err[-2000:]
    assert not (out / "final.pt").exists()
    at = load_checkpoint(out / "last.pt")["step"]
    assert 2 <= at < 8 and len(load_checkpoint(out / "last.pt")["ranks"]) == 2

    code, err = _reap(_start_ranks(world, out, "--resume"))
    assert code == 0, err[-4000:]
    assert f"resumed from {out / 'last.pt'} at step {at}".replace(" ", "") in err.replace(" ", "").replace("\n", "")
    got, want = metrics(out), metrics(ref)
    assert [r["step"] for r in got] == list(range(8))
    for g, w in zip(got, want):
        for k in ("total", "L_t", "L_e", "L_s", "L_u"):
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (g["step"], k, g[k], w[k])
    assert load_checkpoint(out / "final.pt")["step"] == 8
