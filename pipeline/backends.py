"""The vision-language backend protocol that the clip-features / prototypes stages talk to.

A *backend* turns images into dense, CLIP-space pixel embeddings (``clip-i`` in the paper, Sec. 3.2) and texts
into the same space (``clip-t``). :class:`clips4.pipeline.clip.backend.OpenClipBackend` is the real one (open_clip
weights + a MaskCLIP-style dense head); tests and users may plug in others (e.g. a synthetic teacher) through
:func:`load_backend` with a ``"package.module:Factory"`` spec.

Keep a backend small: four members, numpy in and out.

.. code-block:: python

    class MyBackend:
        embed_dim = 512
        logit_scale = 100.0
        def dense_features(self, images): ...   # list[(H, W, 3) uint8] -> list[(h, w, D) float32]
        def encode_text(self, texts): ...       # list[str] -> (N, D) float32
        def info(self): ...                     # dict, JSON-serialisable

    backend = load_backend("mypkg.teacher:MyBackend", seed=3)
"""
from __future__ import annotations

import importlib
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["VisionLanguageBackend", "text_embeddings", "class_text_embeddings", "load_backend", "l2_normalize"]


@runtime_checkable
class VisionLanguageBackend(Protocol):
    """What the pipeline needs from a vision-language model.

    Attributes
    ----------
    embed_dim:
        ``D``, the joint embedding dimension (512 for ViT-B/16, 1024 for RN50).
    logit_scale:
        CLIP's temperature as a plain multiplier, i.e. ``exp(learned logit scale)`` (100.0 for OpenAI CLIP).
        Used to turn cosine similarities into class probabilities (``softmax(logit_scale * sim)``).
    """

    embed_dim: int
    logit_scale: float

    def dense_features(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Dense pixel embeddings.

        Each input is ``(H, W, 3) uint8`` RGB. Each output is ``(h, w, D) float32``, L2-normalised along ``D``,
        at the backend's patch grid and spatially aligned with the *whole* input image: grid cell ``(i, j)``
        covers the image region ``[i*H/h, (i+1)*H/h) x [j*W/w, (j+1)*W/w)``.
        """
        ...

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """``(N, D) float32`` L2-normalised text embeddings, one row per text, in order."""
        ...

    def info(self) -> dict:
        """JSON-serialisable description: ``name``, ``weights`` (tag or path), ``sha256`` of the weight file
        (``None`` where there is no file), ``variant`` and the grid parameters. Goes into the cache fingerprint."""
        ...


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """``x / ||x||`` along ``axis`` in float32; all-zero rows stay zero (no NaN)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32, copy=False)


def text_embeddings(
    backend: VisionLanguageBackend,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 1024,
) -> np.ndarray:
    """Prompt-ensembled class text embeddings (the paper's ``T``, Fig. 3a; CLIP's prompt engineering).

    For each class: fill every template (``"a photo of a {}."``) with the class name, encode them all, normalise
    each, average, re-normalise. Returns ``(K, D) float32`` L2-normalised, rows in ``class_names`` order.

    ``templates`` without ``{}`` are used as they are (a warning would be noisy; they simply do not mention the
    class). Texts are sent to ``backend.encode_text`` in chunks of ``batch_size`` prompts.
    """
    class_names = list(class_names)
    templates = list(templates)
    if not class_names:
        raise ValueError("text_embeddings: no class names given")
    if not templates:
        raise ValueError("text_embeddings: no prompt templates given (use clips4.data.prompt_templates())")
    prompts = [t.format(c) if "{}" in t else t for c in class_names for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        emb = np.asarray(backend.encode_text(prompts[start:start + batch_size]), dtype=np.float32)
        chunks.append(l2_normalize(emb))  # normalise each prompt: templates weigh the same
    all_emb = np.concatenate(chunks, axis=0).reshape(len(class_names), len(templates), -1)
    return l2_normalize(all_emb.mean(axis=1))


def class_text_embeddings(backend: VisionLanguageBackend, class_names: Sequence[str]) -> np.ndarray:
    """``(K, D) float32`` text embeddings of dataset classes: each name mapped to the name CLIP is prompted with
    (:func:`clips4.data.prompt_names`, e.g. ``diningtable`` -> ``dining table``) and ensembled over the 85
    templates. Every class-name prompt goes through here; callers keep the dataset's names for reports."""
    from clips4 import data as bundled

    return text_embeddings(backend, bundled.prompt_names(list(class_names)), bundled.prompt_templates())


def load_backend(spec: str | None = None, **params) -> VisionLanguageBackend:
    """Build a backend from a spec string.

    ``None`` or ``"open_clip"`` -> :class:`clips4.pipeline.clip.backend.OpenClipBackend` ``(**params)``;
    ``"package.module:Factory"`` -> ``import package.module`` and call ``Factory(**params)`` (a class or a
    function). The result must have ``embed_dim``, ``logit_scale``, ``dense_features``, ``encode_text``, ``info``.
    """
    if spec is None or spec in ("open_clip", "openclip"):
        from clips4.pipeline.clip.backend import OpenClipBackend

        return OpenClipBackend(**params)
    from clips4.pipeline.config import current_backend_spec

    spec = current_backend_spec(spec)  # a moved backend's old spelling names the code where it is now
    if ":" not in spec:
        raise ValueError(
            f"backend spec {spec!r} is neither 'open_clip' nor of the form 'package.module:Factory'"
        )
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"backend spec {spec!r}: cannot import module {mod_name!r}: {e}") from e
    factory = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise AttributeError(f"backend spec {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    backend = factory(**params)
    missing = [m for m in ("embed_dim", "logit_scale", "dense_features", "encode_text", "info") if not hasattr(backend, m)]
    if missing:
        raise TypeError(f"backend {spec!r} does not implement VisionLanguageBackend: missing {', '.join(missing)}")
    return backend
