"""The distributed side of training (torchrun / DDP): process-group set-up, per-rank state in checkpoints, logged
means over ranks, and stop requests (SIGTERM / SIGINT) that every rank honours at the same step."""
from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from clips4.pipeline.console import make_console

console = make_console(stderr=True)


class StopRequest:
    """SIGTERM/SIGINT set a flag instead of killing the process: the loop finishes the current step, writes
    ``last.pt`` and returns (nothing beyond the current step is lost). A second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: the user does not want to wait for the checkpoint
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        # DataLoader workers killed by the same signal (killpg, Ctrl-C) must not raise from torch's SIGCHLD
        # handler in the middle of a step or of the checkpoint write; the loop stops before the next fetch
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self._previous:
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    def requested(self, world: int, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (a rank stopping alone would hang the others in the
        next collective)."""
        if world == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag):
            self.signum = int(flag)
        return bool(int(flag))


def dist_setup() -> tuple[int, int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def gather_rank_states(memory: dict, rng: dict, world: int) -> list[dict]:
    """``[{"memory", "rng"}]`` of every rank (rank order); all ranks must call it (a collective under DDP)."""
    state = {"memory": memory, "rng": rng}
    if world <= 1:
        return [state]
    out: list = [None] * world
    dist.all_gather_object(out, state)
    return out


def rank_state(ck: dict, rank: int, world: int) -> dict:
    """This rank's memory bank and RNG state from a checkpoint; rank 0's when it was saved by another world size
    (or before per-rank states were saved): the run continues, though not bit-identically."""
    ranks = ck.get("ranks") or []
    if len(ranks) == world:
        return ranks[rank]
    if world > 1 or len(ranks) > 1:
        console.print(f"[yellow]warning:[/] checkpoint saved by {max(1, len(ranks))} process(es), resumed by {world}: "
                      "every rank starts from rank 0's memory bank and RNG state")
    return {"memory": ck["memory"], "rng": ck["rng"]}


def mean_over_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    """Logged losses: the mean over ranks (each rank's loss covers its own share of the global batch)."""
    if world <= 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}
