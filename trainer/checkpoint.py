"""Atomic, self-describing checkpoints that load with ``weights_only=True``.

A checkpoint holds the model, optimiser, prototypes, step, every RNG state (torch, CUDA, numpy, python), the
resolved config (JSON) and the git SHA. It is written to a temp file and renamed, so a kill during the write
leaves the previous checkpoint intact. Loading refuses a checkpoint whose model signature differs from the
model being trained, naming both.
"""
from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "clips4-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another model; the message names the file."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray; stored as a tensor so weights_only loading accepts it
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[-2], tuple(p[:-2]), p[-1]))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (+ format tag) to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, *, expect_signature: dict | None = None, map_location: str | torch.device = "cpu") -> dict:
    """Load with ``weights_only=True``; refuse another model's checkpoint with a message naming the difference."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors, truncation, foreign formats
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a clips4 checkpoint (format tag {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})")
    if expect_signature is not None:
        got = json.loads(ckpt.get("signature", "{}"))
        diff = {k: (got.get(k), v) for k, v in expect_signature.items() if got.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {path} belongs to another model or config ({detail})")
    return ckpt
