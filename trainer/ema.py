"""Exponential moving average of the student's weights (Polyak averaging, as in mean-teacher / SWA-style training).

``train.ema = d > 0``: after every optimiser step each floating-point entry of the model's ``state_dict``
(parameters and buffers, e.g. BatchNorm running statistics) is averaged as ``e <- d_t·e + (1 - d_t)·w`` with a
short warm-up ``d_t = min(d, (1 + t) / (10 + t))``, ``t`` the number of earlier updates (so the first update takes
0.9 of the new weights); integer buffers (BatchNorm's ``num_batches_tracked``) are copied. ``final.pt`` then holds
the averaged weights as the evaluated model. The average is kept on the unwrapped module (every rank under DDP,
where the parameters are the same on every rank); checkpoints hold it, so a resumed run continues it exactly.
"""
from __future__ import annotations

import torch


def ema_decay(decay: float, t: int) -> float:
    """The decay of update ``t`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + t) / (10.0 + t))


class WeightEMA:
    """An EMA copy of ``model.state_dict()`` (parameters and buffers), updated by :meth:`update`."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = ema_decay(self.decay, self.updates)
        for k, v in model.state_dict().items():
            e = self.weights[k]
            if e.is_floating_point():
                e.mul_(d).add_(v.detach().to(e.dtype), alpha=1.0 - d)
            else:
                e.copy_(v)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.weights) ^ set(state["weights"])
        if missing:
            raise ValueError(f"EMA state does not fit the model (keys differ: {sorted(missing)[:5]})")
        for k, v in state["weights"].items():
            self.weights[k].copy_(v)
        self.updates = int(state["updates"])
