"""Configuration: ``stages.yaml`` + optional ``--config`` overlays + ``--set`` overrides, validated by pydantic.

Resolution order (later wins): the model defaults below → ``stages.yaml`` (the project's, or the one given
with ``--stages``) → each ``--config FILE`` → each ``--set path=value``. A ``--set`` path that starts with a
stage name is relative to that stage's params (``segments.ucm_threshold=0.3`` is
``stages.segments.params.ucm_threshold``); values are parsed as YAML scalars (``0.3``, ``true``, ``[1,2]``).

Every mistake is reported with its dotted path, the file and line it came from where known, and for a
misspelt key the valid keys (and the closest one).
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message lists every problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- sections
class DatasetConfig(Strict):
    kind: Literal["folder", "voc", "context", "cocostuff", "davis", "bsds"] = "folder"
    #: local path or fsspec URL of the dataset root
    root: str = ""
    #: split name (``val``, ``train``, ...); None = the reader's default
    split: str | None = None
    #: process only the first N images (sorted by id); None = all
    limit: int | None = Field(default=None, ge=1)


class RayConfig(Strict):
    #: ``local`` starts (or reuses) a Ray instance on this machine; ``auto`` or ``ray://host:10001`` joins a cluster
    address: str = "local"
    #: ``ray`` fans out over workers; ``local`` runs in this process (debugging, tiny jobs)
    executor: Literal["ray", "local"] = "ray"
    #: number of worker actors (each loads its model once)
    num_workers: int = Field(default=2, ge=1)
    #: images per task / per written cache part
    batch_size: int = Field(default=8, ge=1)
    #: GPUs per actor where CUDA exists (0 = CPU)
    num_gpus: float = Field(default=0.0, ge=0)
    #: CPUs per actor
    num_cpus: float = Field(default=1.0, gt=0)


class SegmentsParams(Strict):
    #: contour detector name (``learned``, ``classical``, ``hed``, ``onnx``); see ``clips4.pipeline.contours``.
    #: ``learned`` (default since it beat ``classical`` on BSDS val, data/contours/MODEL_CARD.md) needs onnxruntime
    #: and falls back to ``classical`` with a warning without it
    detector: str = "learned"
    #: keyword arguments of the detector (e.g. ``{prototxt: ..., caffemodel: ...}`` for hed)
    detector_params: dict[str, Any] = Field(default_factory=dict)
    #: UCM level at which superpixels are cut (HSG: 0.25)
    ucm_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    #: at most this many superpixels per image (HSG: 48); the threshold rises until it holds
    max_segments: int = Field(default=48, ge=1)
    #: regions below this fraction of the image are merged away in the UCM hierarchy (watershed slivers)
    min_area: float = Field(default=3e-4, ge=0.0, lt=1.0)
    #: images above this many pixels are recorded as failed rather than exhausting memory
    max_pixels: int = Field(default=200_000_000, ge=1)


class ClipParams(Strict):
    #: ``None``/``open_clip`` for open_clip, or ``package.module:Factory`` for any vision-language backend
    backend: str | None = None
    #: keyword arguments of a custom backend factory
    backend_params: dict[str, Any] = Field(default_factory=dict)
    #: open_clip model name (``ViT-B-16``, ``RN50``, ...) or a model-config JSON file (custom architectures)
    model: str = "ViT-B-16"
    #: pretrained tag (``openai``), ``hf-hub:org/repo``, ``local-dir:/path`` or a checkpoint file path
    pretrained: str = "openai"
    #: a local checkpoint file; overrides ``pretrained`` (``--clip-checkpoint``)
    checkpoint: str | None = None
    #: directory where open_clip / Hugging Face look for and store weights
    cache_dir: str | None = None
    #: dense feature variant: maskclip (paper), sclip, clearclip, naclip
    variant: str = "maskclip"
    #: resize the short image side to this before sliding (None keeps the size)
    short_side: int | None = Field(default=448, ge=16)
    window: int = Field(default=224, ge=16)
    stride: int = Field(default=112, ge=1)
    #: windows per forward pass
    batch_size: int = Field(default=16, ge=1)
    #: ``auto`` (CUDA where available), ``cpu``, ``cuda``, ``cuda:1``
    device: str = "auto"
    #: ``auto`` (fp16 autocast on CUDA, fp32 on CPU), ``fp32``, ``fp16``
    precision: Literal["auto", "fp32", "fp16"] = "auto"
    #: never try to download weights (also when HF_HUB_OFFLINE=1)
    offline: bool | None = None


class ClipFeaturesParams(Strict):
    clip: ClipParams = Field(default_factory=ClipParams)
    #: where CLIP segments Ŝ come from: k-means over CLIP pixel embeddings (paper) or the UCM superpixels
    segment_source: Literal["kmeans", "ucm"] = "kmeans"
    #: k-means clusters per image for ``segment_source=kmeans``
    n_clusters: int = Field(default=8, ge=1)
    seed: int = 0


class PrototypesParams(Strict):
    #: known classes: a bundled list (voc, context59, cocostuff171), a text file, or None (class-free)
    classes: str | None = "voc"
    #: known prototype = mean of the top-m segments by class probability (paper: 32)
    top_m: int = Field(default=32, ge=1)
    #: number of unknown prototypes (paper: 64)
    n_unknown: int = Field(default=64, ge=0)
    seed: int = 0


class StageDecl(Strict):
    """A stage as declared in stages.yaml: DVC-like params, deps and outs."""

    deps: list[str] = Field(default_factory=list)
    outs: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)


#: stage name -> params model. Other modules register theirs with ``register_params``.
PARAMS_MODELS: dict[str, type[BaseModel]] = {
    "segments": SegmentsParams,
    "clip_features": ClipFeaturesParams,
    "prototypes": PrototypesParams,
}


def register_params(stage: str, model: type[BaseModel]) -> None:
    PARAMS_MODELS[stage] = model


def _register_all() -> None:
    """Params models that live outside the pipeline package (imported late: they import this module)."""
    import clips4.trainer.config  # noqa: F401  (registers "train")


class Config(Strict):
    #: where stage outputs live (local path or fsspec URL)
    cache_root: str = "cache"
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    stages: dict[str, StageDecl] = Field(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: dict[str, StageDecl]) -> dict[str, StageDecl]:
        unknown = [k for k in v if k not in PARAMS_MODELS]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; valid stages: {sorted(PARAMS_MODELS)}")
        return v

    def params(self, stage: str) -> BaseModel:
        """The validated params model of ``stage`` (defaults where stages.yaml is silent)."""
        decl = self.stages.get(stage, StageDecl())
        return PARAMS_MODELS[stage].model_validate(decl.params)

    def deps(self, stage: str) -> list[str]:
        return list(self.stages.get(stage, StageDecl()).deps)


# ------------------------------------------------------------------------------------------- YAML + lines
class _LineLoader(yaml.SafeLoader):
    """Safe loader that remembers the line of every mapping key (for error messages)."""


def _load_with_lines(text: str, source: str) -> tuple[Any, dict[tuple, str]]:
    lines: dict[tuple, str] = {}
    node = yaml.compose(text, Loader=_LineLoader)
    if node is None:
        return {}, lines

    def walk(n, path: tuple):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value
                lines[path + (key,)] = f"{source}:{k.start_mark.line + 1}"
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = f"{source}:{v.start_mark.line + 1}"
                walk(v, path + (i,))

    walk(node, ())
    return yaml.load(text, Loader=yaml.SafeLoader), lines


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_path(d: dict, path: list[str], value: Any) -> None:
    cur = d
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[path[-1]] = value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'segments.ucm_threshold=0.3'`` → (['stages','segments','params','ucm_threshold'], 0.3)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected PATH=VALUE, e.g. segments.ucm_threshold=0.3")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    if parts[0] in PARAMS_MODELS and (len(parts) == 1 or parts[1] not in ("params", "deps", "outs")):
        parts = ["stages", parts[0], "params", *parts[1:]]
    return parts, value


def _allowed_keys(model: type[BaseModel] | None) -> list[str]:
    return sorted(model.model_fields) if model is not None else []


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``path`` (for 'valid keys' hints)."""
    model: Any = Config
    i = 0
    while i < len(path):
        key = path[i]
        if model is Config and key == "stages":
            if i + 1 < len(path):
                stage = path[i + 1]
                if i + 2 < len(path) and path[i + 2] == "params":
                    model = PARAMS_MODELS.get(stage)
                    i += 3
                    continue
                model = StageDecl
                i += 2
                continue
            return None
        field = model.model_fields.get(key) if model is not None else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            i += 1
            continue
        return None
    return model


def _format_errors(err: ValidationError, lines: dict[tuple, str], prefix: tuple = ()) -> str:
    msgs = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        where = lines.get(loc) or next((lines[loc[:j]] for j in range(len(loc) - 1, 0, -1) if loc[:j] in lines), None)
        dotted = ".".join(str(p) for p in loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(_model_at(loc[:-1]))
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + (
                f"; valid keys: {', '.join(allowed)}" if allowed else ""
            )
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        msgs.append(f"  {dotted}: {msg}" + (f"  [{where}]" if where else ""))
    return "\n".join(msgs)


def find_stages_yaml(start: Path | None = None) -> Path | None:
    """The nearest ``stages.yaml`` in the working directory or its parents (like git finds .git)."""
    cur = (start or Path.cwd()).resolve()
    for d in (cur, *cur.parents):
        if (d / "stages.yaml").is_file():
            return d / "stages.yaml"
    return None


def load_config(
    stages_file: str | Path | None = None,
    configs: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    *,
    search: bool = True,
) -> Config:
    """Resolve and validate the configuration (see module docstring). Raises ``ConfigError``."""
    _register_all()
    merged: dict = {}
    lines: dict[tuple, str] = {}
    files: list[Path] = []
    if stages_file is not None:
        files.append(Path(stages_file))
    elif search and (found := find_stages_yaml()) is not None:
        files.append(found)
    files += [Path(c) for c in configs or []]
    for f in files:
        if not f.is_file():
            raise ConfigError(f"config file {f} not found")
        try:
            data, file_lines = _load_with_lines(f.read_text(), str(f))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{f}: not valid YAML: {exc}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{f}: top level must be a mapping, got {type(data).__name__}")
        merged = _deep_merge(merged, data)
        lines.update(file_lines)
    for item in overrides or []:
        path, value = parse_override(item)
        _set_path(merged, path, value)
        lines[tuple(path)] = f"--set {item}"
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError("invalid configuration:\n" + _format_errors(err, lines)) from None
    # validate each stage's params now, so a typo fails before any work starts
    problems = []
    for name, decl in cfg.stages.items():
        try:
            PARAMS_MODELS[name].model_validate(decl.params)
        except ValidationError as err:
            problems.append(_format_errors(err, lines, ("stages", name, "params")))
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))
    return cfg


def resolved_dict(cfg: Config) -> dict:
    """The fully resolved configuration with every stage's params expanded (saved with every output)."""
    out = cfg.model_dump(mode="json")
    for name in PARAMS_MODELS:
        out.setdefault("stages", {}).setdefault(name, {"deps": [], "outs": [], "params": {}})
        out["stages"][name]["params"] = cfg.params(name).model_dump(mode="json")
    return out
