"""Embedding-width checks: a model's pixel embeddings and the CLIP vectors they are compared with must have one
width. A checkpoint trained against another CLIP model (another cache) otherwise fails deep in numpy with a
broadcast error that names neither side."""
from __future__ import annotations

from clips4.trainer.checkpoint import CheckpointError

__all__ = ["EmbeddingWidthError", "check_width", "source_width"]


class EmbeddingWidthError(CheckpointError, ValueError):
    """Embeddings of two widths would be compared; the message names both sides (CLI exit status 2)."""


def source_width(src) -> int | None:
    """Width ``D`` an :class:`~clips4.evaluate.sources.EmbeddingSource` declares (a checkpoint's ``embed_dim``), or
    None when it is only known from its output (the cached teacher features)."""
    d = ((src.info or {}).get("signature") or {}).get("embed_dim")
    return int(d) if d is not None else None


def check_width(got: int | None, want: int | None, *, source: str, against: str) -> None:
    """Raise :class:`EmbeddingWidthError` when both widths are known and differ."""
    if got is None or want is None or int(got) == int(want):
        return
    raise EmbeddingWidthError(
        f"{source} gives {int(got)}-dim embeddings but {against} are {int(want)}-dim: the model was trained "
        f"against another CLIP model than the one configured (clip_features.clip); use the matching config/cache")
