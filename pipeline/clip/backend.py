"""The open_clip backend: :class:`OpenClipBackend` implements :class:`clips4.pipeline.backends.VisionLanguageBackend`
(input protocol, sliding windows, positional-embedding interpolation; see the package docstring)."""
from __future__ import annotations

import math

import numpy as np

from clips4.pipeline.clip.dense_heads import DENSE_VARIANTS, neighbourhood_bias, resnet_dense, vit_last_block
from clips4.pipeline.clip.weights import (WeightsMismatchError, _describe_checkpoint, _is_torchscript,
                                          resolve_weights)
from clips4.pipeline.io import file_sha256


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``window`` every ``stride`` along ``length``, the last one flush with the
    end, so that the windows cover ``[0, length)``. ``length <= window`` gives ``[0]``."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(n)})


# --------------------------------------------------------------------------------------------- backend
class OpenClipBackend:
    """open_clip CLIP as a :class:`~clips4.pipeline.backends.VisionLanguageBackend` (see the module docstring).

    Parameters
    ----------
    model, pretrained:
        open_clip model name and weights (tag, file, ``hf-hub:``, ``local-dir:``). ``checkpoint`` (a file) overrides
        ``pretrained``. Default ``ViT-B-16`` / ``openai`` as the paper.
    variant:
        dense head, one of :data:`DENSE_VARIANTS` (``maskclip``).
    short_side, window, stride:
        input protocol (448, 224, 112); ``short_side=None`` keeps the image size, ``window=None`` runs images whole.
    batch_size:
        windows per forward pass.
    device:
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``None`` (CUDA where available).
    precision:
        ``"auto"`` (fp16 autocast on CUDA, fp32 on CPU), ``"fp32"`` or ``"fp16"`` (autocast; CUDA only).
    cache_dir, offline, probe_timeout:
        where downloaded weights are cached/searched, forced offline mode, seconds for the hub probe.
    quick_gelu:
        override the activation (``None``: from the tag, or recognised official file; open_clip's model default).
    naclip_std:
        std in patches of NACLIP's Gaussian neighbourhood bias.
    """

    def __init__(
        self,
        model: str = "ViT-B-16",
        pretrained: str | None = "openai",
        *,
        checkpoint: str | None = None,
        variant: str = "maskclip",
        short_side: int | None = 448,
        window: int | None = 224,
        stride: int | None = 112,
        batch_size: int = 16,
        device: str | None = None,
        precision: str = "auto",
        cache_dir: str | None = None,
        offline: bool | None = None,
        probe_timeout: float = 2.0,
        quick_gelu: bool | None = None,
        naclip_std: float = 5.0,
    ):
        import open_clip
        import torch

        if variant not in DENSE_VARIANTS:
            raise ValueError(
                f"unknown dense variant {variant!r}; valid: {', '.join(DENSE_VARIANTS)} ("
                + "; ".join(f"{k}: {v}" for k, v in DENSE_VARIANTS.items()) + ")"
            )
        if precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'fp16', not {precision!r}")
        if checkpoint:
            pretrained = checkpoint
        self.variant = variant
        self.naclip_std = float(naclip_std)
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = self.device.type == "cuda" and precision in ("auto", "fp16")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device; use 'fp32' or 'auto' on CPU")

        self.weights = resolve_weights(model, pretrained, cache_dir=cache_dir, offline=offline,
                                       probe_timeout=probe_timeout)
        w = self.weights
        if quick_gelu is None:
            quick_gelu = w.quick_gelu
        pp = {k: v for k, v in (("mean", w.mean), ("std", w.std)) if v is not None}
        kwargs = dict(device="cpu", precision="fp32", force_quick_gelu=bool(quick_gelu),
                      force_preprocess_cfg=pp or None, require_pretrained=True, cache_dir=cache_dir)
        if w.pretrained_file and _is_torchscript(w.pretrained_file):
            kwargs["weights_only"] = False  # legacy OpenAI .pt files are TorchScript archives
        try:
            clip = open_clip.create_model(w.model_name, pretrained=w.pretrained_file, **kwargs)
        except Exception as e:  # noqa: BLE001 - an unloadable file (not a checkpoint, a refused pickle, truncated)
            if isinstance(e, MemoryError):
                raise
            msg = str(e) or type(e).__name__
            if not isinstance(e, RuntimeError):
                msg = f"{type(e).__name__}: {msg}"
            if "state_dict" in msg or "size mismatch" in msg or "Missing key" in msg or "Unexpected key" in msg:
                raise WeightsMismatchError(
                    f"weight file {w.weight_file} does not fit model {model!r}: it holds "
                    f"{_describe_checkpoint(w.weight_file)}. Pick the model name that matches the checkpoint "
                    f"(open_clip.list_models()) or the checkpoint that matches the model.\n"
                    f"(open_clip said: {msg.splitlines()[0][:300]})"
                ) from e
            raise WeightsMismatchError(f"weight file {w.weight_file} cannot be loaded as CLIP model {model!r}: "
                                       f"{msg.splitlines()[0][:300]}") from e
        clip.eval().to(self.device)
        self.model = clip
        self.model_name = w.model_name if w.source in ("tag", "file") else model
        self._tokenizer = open_clip.get_tokenizer(w.model_name, cache_dir=cache_dir)
        visual = clip.visual
        ppcfg = open_clip.get_model_preprocess_cfg(clip)
        self.mean = tuple(float(x) for x in ppcfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(x) for x in ppcfg.get("std", open_clip.OPENAI_DATASET_STD))

        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if isinstance(visual, VisionTransformer):
            self.arch = "vit"
            if visual.attn_pool is not None:
                raise ValueError(f"{model!r}: vision towers with an attentional pooler (CoCa) are not supported")
            last = visual.transformer.resblocks[-1]
            if not isinstance(last, ResidualAttentionBlock) or last.attn.in_proj_weight is None:
                raise ValueError(f"{model!r}: only plain open_clip ViT blocks (nn.MultiheadAttention with a packed "
                                 f"in_proj_weight) are supported for dense features")
            self.patch = int(visual.patch_size[0])
            self.native_grid = tuple(int(g) for g in visual.grid_size)
        elif isinstance(visual, ModifiedResNet):
            self.arch = "resnet"
            if variant != "maskclip":
                raise ValueError(f"dense variant {variant!r} is ViT-only; {model!r} is a ResNet (ModifiedResNet). "
                                 f"Use variant='maskclip' for ResNets.")
            self.patch = 32  # stem /4, then layer2..4 /2 each
            self.native_grid = (visual.image_size // 32,) * 2 if isinstance(visual.image_size, int) else None
        else:
            raise ValueError(f"{model!r}: vision tower {type(visual).__name__} is not supported (ViT or ModifiedResNet)")

        p = self.patch
        self.short_side = int(short_side) if short_side else None
        self.window = max(p, int(window) // p * p) if window else None
        self.stride = max(p, int(stride or window) // p * p) if window else None
        self.embed_dim = int(visual.output_dim)
        self.logit_scale = float(clip.logit_scale.detach().float().exp().item())
        self.sha256 = file_sha256(w.weight_file)
        self._pos_cache: dict = {}
        self._mean_t = torch.tensor(self.mean, device=self.device).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(3, 1, 1)

    # ----------------------------------------------------------------------------------------- protocol
    def info(self) -> dict:
        import open_clip

        w = self.weights
        return {
            "name": "open_clip",
            "model": self.model_name,
            "weights": w.tag or w.pretrained_file or w.model_name,
            "weights_source": w.source,
            "weight_file": w.weight_file,
            "sha256": self.sha256,
            "variant": self.variant,
            "arch": self.arch,
            "embed_dim": self.embed_dim,
            "patch": self.patch,
            "short_side": self.short_side,
            "window": self.window,
            "stride": self.stride,
            "mean": list(self.mean),
            "std": list(self.std),
            "precision": "fp16-autocast" if self.autocast else "fp32",
            **({"naclip_std": self.naclip_std} if self.variant == "naclip" else {}),
            "open_clip_version": open_clip.__version__,
        }

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """``(N, D) float32`` L2-normalised CLIP text embeddings (``clip-t``)."""
        import torch

        out = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            for s in range(0, len(texts), batch_size):
                tok = self._tokenizer(list(texts[s:s + batch_size])).to(self.device)
                emb = self.model.encode_text(tok).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """The ``(h, w)`` feature grid that :meth:`dense_features` returns for an ``height x width`` image."""
        H2, W2 = self._target_size(height, width)
        return H2 // self.patch, W2 // self.patch

    def dense_features(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Dense CLIP pixel embeddings, one ``(h, w, D) float32`` L2-normalised array per ``(H, W, 3) uint8``
        image, aligned with the whole image (cell ``(i, j)`` covers ``[i*H/h, (i+1)*H/h) x [j*W/w, (j+1)*W/w)``)."""
        import torch
        import torch.nn.functional as F

        p = self.patch
        prepared = [self._prepare(img) for img in images]
        D = self.embed_dim
        sums = [torch.zeros(t.shape[1] // p, t.shape[2] // p, D, device=self.device) for t in prepared]
        counts = [torch.zeros(t.shape[1] // p, t.shape[2] // p, 1, device=self.device) for t in prepared]
        jobs: list[tuple[int, int, int, int, int]] = []  # image, y0, x0, wh, ww (pixels)
        for i, t in enumerate(prepared):
            H2, W2 = t.shape[1:]
            if self.window is None:
                jobs.append((i, 0, 0, H2, W2))
                continue
            for y0 in window_starts(H2, self.window, self.stride):
                for x0 in window_starts(W2, self.window, self.stride):
                    jobs.append((i, y0, x0, self.window, self.window))
        # windows of equal size are batched across images; whole-image jobs run one by one
        bs = self.batch_size if self.window is not None else 1
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            for s in range(0, len(jobs), bs):
                chunk = jobs[s:s + bs]
                batch = torch.stack([prepared[i][:, y0:y0 + h, x0:x0 + w] for i, y0, x0, h, w in chunk])
                feats = F.normalize(self._dense_forward(batch).float(), dim=-1)  # (B, gh, gw, D)
                for (i, y0, x0, h, w), f in zip(chunk, feats):
                    gy, gx = y0 // p, x0 // p
                    sums[i][gy:gy + h // p, gx:gx + w // p] += f
                    counts[i][gy:gy + h // p, gx:gx + w // p] += 1
        out = []
        for sm, c in zip(sums, counts):
            f = F.normalize(sm / c.clamp_min(1), dim=-1)
            out.append(f.cpu().numpy().astype(np.float32, copy=False))
        return out

    # ----------------------------------------------------------------------------------------- internals
    def _target_size(self, H: int, W: int) -> tuple[int, int]:
        p = self.patch
        s = self.short_side / min(H, W) if self.short_side else 1.0
        if self.window:
            s = max(s, self.window / min(H, W))  # smaller than a window: resize up (aspect kept)
        H2 = max(p, int(round(H * s / p)) * p)
        W2 = max(p, int(round(W * s / p)) * p)
        if self.window:
            H2, W2 = max(H2, self.window), max(W2, self.window)
        return H2, W2

    def _prepare(self, img: np.ndarray):
        """uint8 image -> normalised ``(3, H', W')`` float tensor on the device, resized to the target grid."""
        import torch
        import torch.nn.functional as F

        a = np.asarray(img)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"dense_features expects (H, W, 3) uint8 RGB images, got shape {a.shape}")
        a = a[:, :, :3]
        if a.dtype != np.uint8:
            raise ValueError(f"dense_features expects uint8 images, got {a.dtype}")
        H, W = a.shape[:2]
        H2, W2 = self._target_size(H, W)
        # a read-only array (decoded by PIL, read from a cache) is copied: torch.from_numpy needs writable memory
        a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a, order="C")
        t = torch.from_numpy(a).to(self.device).permute(2, 0, 1).float().div_(255.0)
        if (H2, W2) != (H, W):
            # bicubic as CLIP's preprocessing; antialias for downscaling
            t = F.interpolate(t[None], size=(H2, W2), mode="bicubic", align_corners=False, antialias=True)[0]
            t = t.clamp_(0.0, 1.0)
        return (t - self._mean_t) / self._std_t

    def _pos_embed(self, gh: int, gw: int, dtype, device):
        """ViT positional embedding for a ``gh x gw`` patch grid: the class position as is, the patch positions
        bicubically interpolated from the native grid where it differs (as MaskCLIP / open_clip do)."""
        import torch
        import torch.nn.functional as F

        key = (gh, gw, dtype, str(device))
        if key not in self._pos_cache:
            pe = self.model.visual.positional_embedding.float()
            nh, nw = self.native_grid
            if (gh, gw) == (nh, nw):
                out = pe
            else:
                patch = pe[1:].reshape(1, nh, nw, -1).permute(0, 3, 1, 2)
                patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
                out = torch.cat([pe[:1], patch.permute(0, 2, 3, 1).reshape(gh * gw, -1)], dim=0)
            self._pos_cache[key] = out.to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def _dense_forward(self, x):
        """``(B, 3, S, S)`` normalised windows -> ``(B, S/p, S/p, D)`` unnormalised dense embeddings."""
        return self._vit_dense(x) if self.arch == "vit" else resnet_dense(self.model.visual, x)

    def _vit_dense(self, x):
        import torch

        v = self.model.visual
        x = v.conv1(x)  # (B, width, gh, gw)
        B, C, gh, gw = x.shape
        x = x.reshape(B, C, gh * gw).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._pos_embed(gh, gw, x.dtype, x.device)
        x = v.ln_pre(x)  # patch dropout is identity in eval mode and skipped here
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        x = vit_last_block(blocks[-1], x, (gh, gw), self.variant, self._neighbourhood)  # (B, 1 + gh*gw, width), batch first
        x = v.ln_post(x[:, 1:])
        if v.proj is not None:
            x = x @ v.proj.to(x.dtype)
        return x.reshape(B, gh, gw, -1)

    def _neighbourhood(self, grid, dtype, device):
        """NACLIP's bias for ``grid`` (cached per grid, dtype and device)."""
        key = ("nb", grid, dtype, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = neighbourhood_bias(grid, self.naclip_std).to(device=device, dtype=dtype)
        return self._pos_cache[key]
