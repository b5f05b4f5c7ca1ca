"""Where CLIP weights are on disk: open_clip tags, files, ``hf-hub:`` and ``local-dir:`` resolved *before* a
model is built, so a missing download fails at once with a message that names the weights, where they were looked
for and how to provide them (random weights are never used)."""
from __future__ import annotations

import logging
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from clips4.pipeline.io import file_sha256

log = logging.getLogger(__name__)

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
