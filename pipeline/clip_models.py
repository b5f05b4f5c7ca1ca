"""CLIP loading through open_clip and dense pixel embeddings (the paper's ``clip-i``, Sec. 3.2).

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

import hashlib
import logging
import math
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "OpenClipBackend",
    "DENSE_VARIANTS",
    "WeightsNotFoundError",
    "WeightsMismatchError",
    "ResolvedWeights",
    "resolve_weights",
    "file_sha256",
    "window_starts",
]

#: name -> one-line description; the dense head implementations are methods of OpenClipBackend.
DENSE_VARIANTS: dict[str, str] = {
    "maskclip": "MaskCLIP: last block attention -> value path (v-proj, out-proj); residual + MLP kept (ViT, ResNet)",
    "sclip": "SCLIP: last block attention softmax(qq^T)+softmax(kk^T); residual + MLP kept (ViT only)",
    "clearclip": "ClearCLIP: last block attention softmax(qq^T); no residual, no MLP (ViT only)",
    "naclip": "NACLIP: last block attention softmax(kk^T + Gaussian neighbourhood); no residual, no MLP (ViT only)",
}

HOW_TO_PROVIDE = (
    "Provide them with --clip-checkpoint PATH (a weight file for this model, e.g. open_clip_pytorch_model.bin or "
    "the OpenAI .pt file; Python: OpenClipBackend(pretrained=PATH)), point --clip-cache-dir DIR at a cache that "
    "holds them (Hugging Face hub layout or the file itself; Python: cache_dir=DIR), use local-dir:/path for a "
    "folder with open_clip_config.json + weights, or run once with network access so open_clip can download them."
)


class WeightsNotFoundError(FileNotFoundError):
    """CLIP weights are neither on disk nor downloadable now. The message says where we looked and what to do."""


class WeightsMismatchError(ValueError):
    """A weight file does not fit the requested architecture."""


# --------------------------------------------------------------------------------------------- weights
_SHA_CACHE: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (memoised by path, size and mtime: the weight file is hashed once per process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@dataclass
class ResolvedWeights:
    """Where the weights of a (model, pretrained) pair are on disk.

    ``model_name`` is what goes to ``open_clip.create_model`` (``local-dir:...`` for folders and Hub snapshots),
    ``pretrained_file`` the file given as its ``pretrained`` (``None`` for ``local-dir:``), ``weight_file`` the
    file actually loaded (for the sha256), ``tag`` the open_clip tag (given or recognised), ``source`` one of
    ``tag``, ``file``, ``local-dir``, ``hf-hub``; ``quick_gelu`` / ``mean`` / ``std`` come from the tag.
    """

    model_name: str
    pretrained_file: str | None
    weight_file: str
    source: str
    tag: str | None = None
    quick_gelu: bool | None = None
    mean: tuple | None = None
    std: tuple | None = None
    looked_in: list[str] = field(default_factory=list)


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def _env_offline() -> bool:
    return _truthy(os.environ.get("CLIPS4_OFFLINE")) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def _hf_cache_dirs(cache_dir: str | None) -> list[Path]:
    """Hugging Face hub cache folders to search, read from the environment at call time (not import time)."""
    out: list[Path] = []
    if cache_dir:
        out += [Path(cache_dir), Path(cache_dir) / "hub"]
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    if os.environ.get("XDG_CACHE_HOME"):
        out.append(Path(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    seen, uniq = set(), []
    for p in out:
        if str(p) not in seen:
            seen.add(str(p))
            uniq.append(p)
    return uniq


def _hf_cached(repo_id: str, filenames: Sequence[str], cache_dir: str | None, looked: list[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for d in _hf_cache_dirs(cache_dir):
        for fn in filenames:
            looked.append(f"{d}/models--{repo_id.replace('/', '--')}/snapshots/*/{fn}")
            if not d.is_dir():
                continue
            try:
                hit = try_to_load_from_cache(repo_id, fn, cache_dir=str(d))
            except Exception:  # malformed cache: treat as a miss
                hit = None
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    return None


def _probe(host: str, port: int = 443, timeout: float = 2.0) -> tuple[bool, str]:
    """Can we open a TCP connection to ``host:port``? Runs in a daemon thread so that a hanging DNS lookup
    cannot hold us longer than ``timeout`` seconds (socket timeouts do not cover getaddrinfo)."""
    import socket

    result: dict = {}

    def run():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError as e:
            result["err"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if result.get("ok"):
        return True, ""
    return False, result.get("err", f"no answer from {host}:{port} within {timeout:g} s")


#: indirection so tests can simulate a hanging or failing network without touching it
_reachable: Callable[[str, int, float], tuple[bool, str]] = _probe


def _can_download(host: str, offline: bool | None, probe_timeout: float) -> tuple[bool, str]:
    if offline is None:
        offline = _env_offline()
    if offline:
        return False, "offline mode (offline=True, CLIPS4_OFFLINE or HF_HUB_OFFLINE is set)"
    ok, why = _reachable(host, 443, probe_timeout)
    return ok, (f"{host} is not reachable ({why})" if not ok else "")


def _not_found(what: str, looked: list[str], why: str) -> WeightsNotFoundError:
    where = "\n  ".join(dict.fromkeys(looked)) or "(nowhere)"
    return WeightsNotFoundError(
        f"CLIP weights for {what} are not available locally and cannot be downloaded now: {why}.\n"
        f"Looked for them in:\n  {where}\n{HOW_TO_PROVIDE}"
    )


def _find_checkpoint_in_dir(d: Path) -> str | None:
    try:  # use open_clip's own choice so that we hash the file it loads
        from open_clip.factory import _find_checkpoint_in_dir as oc_find

        return oc_find(d)
    except ImportError:  # pragma: no cover - private helper moved
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"):
            if (d / name).is_file():
                return str(d / name)
        files = sorted(list(d.glob("*.safetensors")) + list(d.glob("*.bin")) + list(d.glob("*.pth")))
        return str(files[0]) if files else None


def _resolve_local_dir(path: str) -> ResolvedWeights:
    d = Path(path).expanduser()
    looked = [str(d)]
    if not d.is_dir():
        raise _not_found(f"local-dir:{path}", looked, f"folder {d} does not exist")
    if not (d / "open_clip_config.json").is_file():
        raise _not_found(f"local-dir:{path}", [str(d / 'open_clip_config.json')],
                         f"{d} holds no open_clip_config.json")
    ckpt = _find_checkpoint_in_dir(d)
    if ckpt is None:
        raise _not_found(f"local-dir:{path}", [f"{d}/*.safetensors|*.bin|*.pth"], f"{d} holds no weight file")
    return ResolvedWeights(f"local-dir:{d}", None, ckpt, "local-dir", looked_in=looked)


def _resolve_hf_hub(repo_id: str, cache_dir: str | None, offline: bool | None, probe_timeout: float) -> ResolvedWeights:
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    looked: list[str] = []
    cfg = _hf_cached(repo_id, [HF_CONFIG_NAME], cache_dir, looked)
    weights = _hf_cached(repo_id, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME], cache_dir, looked) if cfg else None
    if cfg and weights and Path(cfg).parent == Path(weights).parent:
        r = _resolve_local_dir(str(Path(cfg).parent))
        r.source, r.looked_in = "hf-hub", looked
        return r
    ok, why = _can_download("huggingface.co", offline, probe_timeout)
    if not ok:
        raise _not_found(f"hf-hub:{repo_id}", looked, why)
    from huggingface_hub import hf_hub_download

    try:
        cfg = hf_hub_download(repo_id, HF_CONFIG_NAME, cache_dir=cache_dir)
        try:
            hf_hub_download(repo_id, HF_SAFE_WEIGHTS_NAME, cache_dir=cache_dir)
        except Exception:
            hf_hub_download(repo_id, HF_WEIGHTS_NAME, cache_dir=cache_dir)
    except Exception as e:
        raise _not_found(f"hf-hub:{repo_id}", looked, f"download failed ({type(e).__name__}: {e})") from e
    r = _resolve_local_dir(str(Path(cfg).parent))
    r.source, r.looked_in = "hf-hub", looked
    return r


def _tag_candidates(model: str, tag_cfg: dict, cache_dir: str | None, looked: list[str]) -> str | None:
    """A cached file for an open_clip tag: the Hub cache (as open_clip downloads it) or the legacy URL cache."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if tag_cfg.get("file"):
        looked.append(tag_cfg["file"])
        if os.path.isfile(tag_cfg["file"]):
            return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # "org/repo/" -> default file names, as open_clip
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename and (filename.endswith(".bin") or filename.endswith(".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        hit = _hf_cached(repo_id, names, cache_dir, looked)
        if hit:
            return hit
    url = tag_cfg.get("url", "")
    if url:
        base = os.path.basename(urlparse(url).path)
        expected = url.split("/")[-2] if "openaipublic" in url else ""
        for d in [cache_dir, os.path.expanduser("~/.cache/clip")]:
            if not d:
                continue
            f = Path(d) / base
            looked.append(str(f))
            if f.is_file() and (not expected or file_sha256(f).startswith(expected)):
                return str(f)
    return None


def _guess_tag(model: str, path: str) -> str | None:
    """Recognise an official checkpoint given as a file, so that its tag's quick_gelu / mean / std are used.

    OpenAI checkpoints carry their sha256 in the download URL; Hub snapshots carry the repo in their path."""
    import open_clip

    try:
        tags = open_clip.list_pretrained_tags_by_model(model)
    except Exception:
        return None
    sha = None
    for tag in tags:
        cfg = open_clip.get_pretrained_cfg(model, tag)
        hub = (cfg.get("hf_hub") or "").rstrip("/")
        if hub and f"models--{hub.split('/')[0]}--{hub.split('/')[1]}" in path:
            return tag
        url = cfg.get("url") or ""
        if "openaipublic" in url and os.path.basename(path) == os.path.basename(urlparse(url).path):
            sha = sha or file_sha256(path)
            if sha.startswith(url.split("/")[-2]):
                return tag
    return None


def resolve_weights(
    model: str = "ViT-B-16",
    pretrained: str | None = "openai",
    *,
    cache_dir: str | None = None,
    offline: bool | None = None,
    probe_timeout: float = 2.0,
) -> ResolvedWeights:
    """Find (or, when online, download) the weights for ``model`` + ``pretrained`` before building anything.

    Raises :class:`WeightsNotFoundError` within about ``probe_timeout`` seconds when the weights are neither cached
    nor downloadable; ``ValueError`` for an unknown model name or tag (listing the valid ones).
    """
    import open_clip

    for spec in (pretrained, model):
        if spec and spec.startswith("local-dir:"):
            return _resolve_local_dir(spec[len("local-dir:"):])
        if spec and spec.startswith("hf-hub:"):
            return _resolve_hf_hub(spec[len("hf-hub:"):], cache_dir, offline, probe_timeout)

    if model.endswith(".json") and os.path.isfile(model):
        # a model config file (open_clip's format: embed_dim, vision_cfg, text_cfg): registered under its stem
        open_clip.add_model_config(model)
        model = Path(model).stem
    name = model.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise ValueError(
            f"unknown open_clip model {model!r}; known: {', '.join(open_clip.list_models())} "
            f"(or use hf-hub:org/repo, local-dir:/path, or register a config with open_clip.add_model_config)"
        )
    if not pretrained:
        raise ValueError(
            f"no weights given for {model!r} (pretrained is empty); clips4 never uses random CLIP weights. "
            + HOW_TO_PROVIDE
        )
    p = Path(pretrained).expanduser()
    if p.is_file():
        tag = _guess_tag(name, str(p))
        r = ResolvedWeights(name, str(p), str(p), "file", tag=tag, looked_in=[str(p)])
        if tag:
            cfg = open_clip.get_pretrained_cfg(name, tag)
            r.quick_gelu, r.mean, r.std = cfg.get("quick_gelu", False), cfg.get("mean"), cfg.get("std")
        return r
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if any(c in pretrained for c in "/\\") or p.suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz"):
            raise _not_found(f"{model!r} from file {pretrained!r}", [str(p)], "the file does not exist")
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for {model!r}; known tags: "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or '(none)'}; or give a checkpoint file path"
        )
    looked: list[str] = []
    hit = _tag_candidates(name, tag_cfg, cache_dir, looked)
    if hit is None:
        host = "huggingface.co" if tag_cfg.get("hf_hub") else urlparse(tag_cfg.get("url", "")).hostname or "huggingface.co"
        ok, why = _can_download(host, offline, probe_timeout)
        if not ok:
            raise _not_found(f"{model!r} pretrained={pretrained!r}", looked, why)
        from open_clip.pretrained import download_pretrained

        try:
            hit = download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as e:
            raise _not_found(f"{model!r} pretrained={pretrained!r}", looked,
                             f"download failed ({type(e).__name__}: {e})") from e
        if not hit or not os.path.isfile(hit):
            raise _not_found(f"{model!r} pretrained={pretrained!r}", looked, "download returned no file")
    return ResolvedWeights(name, hit, hit, "tag", tag=pretrained, quick_gelu=tag_cfg.get("quick_gelu", False),
                           mean=tag_cfg.get("mean"), std=tag_cfg.get("std"), looked_in=looked)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _describe_checkpoint(path: str) -> str:
    """A short description of what architecture a state dict holds, for mismatch errors."""
    try:
        import torch
        from open_clip.factory import load_state_dict

        sd = load_state_dict(path, weights_only=not _is_torchscript(path))
    except Exception as e:  # pragma: no cover - unreadable file
        return f"(could not read it: {e})"
    if "visual.conv1.weight" in sd and "visual.proj" in sd:
        w = sd["visual.conv1.weight"]
        layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        return f"a ViT (width {w.shape[0]}, patch {w.shape[-1]}, {layers} layers, embed dim {sd['visual.proj'].shape[1]})"
    if "visual.layer1.0.conv1.weight" in sd:
        counts = [len({k.split('.')[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        return f"a ModifiedResNet (layers {counts}, width {sd['visual.layer1.0.conv1.weight'].shape[0]})"
    keys = list(sd)[:5]
    return f"an unrecognised state dict (first keys {keys}); is it an open_clip/OpenAI CLIP checkpoint?" if keys else "an empty state dict"


# --------------------------------------------------------------------------------------------- geometry
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
        except RuntimeError as e:
            msg = str(e)
            if "state_dict" in msg or "size mismatch" in msg or "Missing key" in msg or "Unexpected key" in msg:
                raise WeightsMismatchError(
                    f"weight file {w.weight_file} does not fit model {model!r}: it holds "
                    f"{_describe_checkpoint(w.weight_file)}. Pick the model name that matches the checkpoint "
                    f"(open_clip.list_models()) or the checkpoint that matches the model.\n"
                    f"(open_clip said: {msg.splitlines()[0][:300]})"
                ) from e
            raise
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
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device).permute(2, 0, 1).float().div_(255.0)
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
        return self._vit_dense(x) if self.arch == "vit" else self._resnet_dense(x)

    def _resnet_dense(self, x):
        import torch.nn.functional as F

        v = self.model.visual
        x = v.stem(x)
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
        x = x.permute(0, 2, 3, 1)
        ap = v.attnpool
        # the attention pool's value and output projections as 1x1 convolutions (= per-position linear maps);
        # no positional embedding, no query/key (MaskCLIP)
        x = F.linear(x, ap.v_proj.weight, ap.v_proj.bias)
        return F.linear(x, ap.c_proj.weight, ap.c_proj.bias)

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
        x = self._last_block(blocks[-1], x, (gh, gw))  # (B, 1 + gh*gw, width), batch first
        x = v.ln_post(x[:, 1:])
        if v.proj is not None:
            x = x @ v.proj.to(x.dtype)
        return x.reshape(B, gh, gw, -1)

    def _last_block(self, blk, x, grid):
        """The modified last ViT block for ``self.variant`` on batch-first tokens ``(B, L, C)``."""
        import torch
        import torch.nn.functional as F

        attn = blk.attn
        C = x.shape[-1]
        W, b = attn.in_proj_weight, attn.in_proj_bias
        y = blk.ln_1(x)
        if self.variant == "maskclip":
            # value path only: v = y Wv^T + bv, then out_proj; residual and MLP kept (MaskCLIP)
            val = F.linear(y, W[2 * C:], None if b is None else b[2 * C:])
            x = x + blk.ls_1(attn.out_proj(val))
            return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

        B, L, _ = x.shape
        H = attn.num_heads
        hd = C // H
        q, k, val = F.linear(y, W, b).chunk(3, dim=-1)
        q, k, val = (t.reshape(B, L, H, hd).transpose(1, 2) for t in (q, k, val))  # (B, H, L, hd)
        scale = hd ** -0.5
        if self.variant == "sclip":
            a = (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1)
        elif self.variant == "clearclip":
            a = (q @ q.transpose(-1, -2) * scale).softmax(-1)
        elif self.variant == "naclip":
            logits = k @ k.transpose(-1, -2) * scale
            a = (logits + self._neighbourhood(grid, logits.dtype, logits.device)).softmax(-1)
        else:  # pragma: no cover - checked in __init__
            raise ValueError(self.variant)
        o = (a @ val).transpose(1, 2).reshape(B, L, C)
        o = attn.out_proj(o)
        if self.variant == "sclip":
            x = x + blk.ls_1(o)
            return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return o  # clearclip / naclip: no residual, no MLP

    def _neighbourhood(self, grid, dtype, device):
        """NACLIP's additive Gaussian bias ``exp(-|p - q|^2 / (2 std^2))`` between patch positions; zero for the
        class token's row and column. ``(1 + gh*gw, 1 + gh*gw)``."""
        import torch

        key = ("nb", grid, dtype, str(device))
        if key not in self._pos_cache:
            gh, gw = grid
            yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                                    indexing="ij")
            pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)
            d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
            g = torch.exp(-d2 / (2 * self.naclip_std ** 2))
            out = torch.zeros(gh * gw + 1, gh * gw + 1)
            out[1:, 1:] = g
            self._pos_cache[key] = out.to(device=device, dtype=dtype)
        return self._pos_cache[key]
