"""CLIP through open_clip: weights resolution (:mod:`.weights`), dense heads (:mod:`.dense_heads`) and the backend
(:mod:`.backend`) that turns images into dense pixel embeddings (the paper's ``clip-i``, Sec. 3.2).

:class:`OpenClipBackend` implements :class:`clips4.pipeline.backends.VisionLanguageBackend`:

* **Loading** – ``model`` is an open_clip model name (``ViT-B-16``, ``RN50``, or one registered with
  ``open_clip.add_model_config``), a model config ``.json`` file (registered under its stem), or
  ``hf-hub:org/repo`` / ``local-dir:/path``; ``pretrained`` is an open_clip tag
  (``openai``), a checkpoint file, ``hf-hub:org/repo`` or ``local-dir:/path`` (a folder with
  ``open_clip_config.json`` + weights). Weights are resolved *before* the model is built
  (:func:`resolve_weights`): the local caches are searched first, and when nothing is there and we are offline
  (``offline=True``, ``CLIPS4_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) or a 2-second probe of the download host fails,
  :class:`WeightsNotFoundError` is raised at once, naming the weights, where they were looked for and how to
  provide them. Random weights are never used. A checkpoint of another architecture raises
  :class:`WeightsMismatchError`.
* **Dense variants** (:data:`DENSE_VARIANTS`) – how the last block turns patch tokens into pixel embeddings:

  ``maskclip`` (default, MaskCLIP, Zhou et al. 2022, as the paper uses)
      ViT: in the last transformer block the attention is replaced by the value path – value part of the
      in-projection, then the out-projection (no query/key mixing: each token only sees itself). The block's
      residual and MLP are **kept** (``x = x + out_proj(v(ln_1(x))); x = x + mlp(ln_2(x))``), then ``ln_post`` and
      ``proj``, exactly as the MaskCLIP code does. (Some re-implementations drop the residual and MLP, which is
      what ClearCLIP studies; that is the ``clearclip`` variant below, not MaskCLIP.)
      ResNet (ModifiedResNet + AttentionPool2d): the attention pool's value and output projections are applied
      as two 1x1 convolutions to the last stage's feature map. As in MaskCLIP, the attention pool's positional
      embedding is *not* added (it is tied to the 7x7 training grid and to the global query; MaskCLIP's dense
      head applies v_proj and c_proj to the raw layer4 features).
  ``sclip`` (SCLIP, correlative self-attention)
      attention = softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)); residual and MLP kept (as SCLIP).
  ``clearclip`` (ClearCLIP)
      attention = softmax(q q^T / sqrt(d)); no residual, no MLP.
  ``naclip`` (NACLIP)
      attention = softmax(k k^T / sqrt(d) + Gaussian neighbourhood bias (std ``naclip_std`` patches, 5 as NACLIP));
      the reduced block of NACLIP: no residual, no MLP.

  The last three are ViT-only; asking for them on a ResNet raises ``ValueError``.
* **Input protocol** (``dense_features``) – each image is resized so its short side is ``short_side`` (448;
  ``None`` keeps the size), both sides rounded to a multiple of the patch stride so the output grid tiles the
  whole image exactly; an image whose short side is still smaller than ``window`` is resized *up* (aspect kept)
  until it equals the window (resizing rather than padding keeps every grid cell on real image content and the
  alignment contract exact). A ``window`` x ``window`` window (224) slides with ``stride`` (112) – both rounded to
  multiples of the patch stride so window grids line up – and, where the window is not the model's native input
  size, the ViT positional embeddings are interpolated (bicubic) to the window's grid. Each window's features are
  L2-normalised, overlapping windows are averaged per grid cell and the result is L2-normalised again.
  ``window=None`` runs each image whole in one pass. Pixels are normalised with the model's mean/std; windows
  are batched (``batch_size``) under ``torch.inference_mode``; on CUDA with fp16 autocast (``precision="auto"``).
  Output ``(h, w, D) float32`` with ``h = H'/p, w = W'/p`` (``p`` = 16 for ViT-B/16, 32 for RN50).
"""
from __future__ import annotations

from clips4.pipeline.clip.backend import OpenClipBackend, window_starts
from clips4.pipeline.clip.dense_heads import DENSE_VARIANTS
from clips4.pipeline.clip.weights import (ResolvedWeights, WeightsMismatchError, WeightsNotFoundError,
                                          resolve_weights)
from clips4.pipeline.io import file_sha256

__all__ = ["OpenClipBackend", "DENSE_VARIANTS", "WeightsNotFoundError", "WeightsMismatchError", "ResolvedWeights",
           "resolve_weights", "file_sha256", "window_starts"]
