"""Loading what training produced, for evaluation and inference: a trained model from its checkpoint, and the
prototypes stage's prototypes and class texts. Importing this does not import the training loop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from clips4.trainer.checkpoint import load_checkpoint
from clips4.trainer.model import ModelConfig


def load_prototypes(url: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(known names, known (K,D), unknown (U,D)) float32 from a prototypes stage output."""
    t, vecs = _vector_table(url, "prototypes.parquet")
    d = vecs.shape[1]
    kinds = t["kind"].to_pylist()
    known = [i for i, k in enumerate(kinds) if k == "known"]
    unknown = [i for i, k in enumerate(kinds) if k == "unknown"]
    names = [t["name"][i].as_py() for i in known]
    return names, torch.from_numpy(vecs[known]).reshape(-1, d), torch.from_numpy(vecs[unknown]).reshape(-1, d)


def load_class_texts(url: str) -> tuple[list[str], np.ndarray]:
    """(known class names, ``(K, D) float32`` text embeddings) from a prototypes stage output (``text.parquet``)."""
    try:
        t, vecs = _vector_table(url, "text.parquet")
    except FileNotFoundError:
        return [], np.zeros((0, 0), np.float32)
    return t["name"].to_pylist(), vecs


def _vector_table(url: str, name: str):
    """(pyarrow table, its ``vector`` column as ``(N, D) float32``) of the Parquet file ``name`` in a stage output."""
    import fsspec

    with fsspec.open(url.rstrip("/") + "/" + name, "rb") as f:
        t = pq.read_table(f)
    d = t.schema.field("vector").type.list_size
    return t, t["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """A trained model from a checkpoint (weights_only) for evaluation; returns (model in eval mode, checkpoint)."""
    from clips4.trainer.model import PixelEmbeddingNet, build_backbone

    from clips4.trainer.checkpoint import CheckpointError

    ck = load_checkpoint(path, map_location=device)
    if not isinstance(ck, dict) or "signature" not in ck or "model" not in ck:
        raise CheckpointError(f"{path} is not a clips4 train checkpoint (it has no model signature); pass a "
                              f"final.pt or step-*.pt written by `clips4 train`")
    sig = json.loads(ck["signature"])
    mc = ModelConfig(backbone=sig["backbone"], embed_dim=sig["embed_dim"], backbone_weights=None,
                     head_dim=sig["head_dim"], psp_bins=tuple(sig["psp_bins"]), input=sig.get("input", "rgb"))
    model = PixelEmbeddingNet(mc, build_backbone(mc.backbone))  # weights come from the checkpoint
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit its declared model {sig}: {str(exc)[:300]}") from None
    return model.to(device).eval(), ck
