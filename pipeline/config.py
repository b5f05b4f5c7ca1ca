"""Configuration: ``stages.yaml`` + optional ``--config`` overlays + ``--set`` overrides, validated by pydantic.

Resolution order (later wins): the model defaults below → ``stages.yaml`` (the project's, or the one given
with ``--stages``) → ``clips4.yaml`` in the working directory (the project's config, read by every command) →
each ``--config FILE`` → each ``--set path=value``. A ``--set`` path that starts with a
stage name is relative to that stage's params (``segments.ucm_threshold=0.3`` is
``stages.segments.params.ucm_threshold``); values are parsed as YAML scalars (``0.3``, ``true``, ``[1,2]``).

Every mistake is reported with its dotted path, the file and line it came from where known, and for a
misspelt key the valid keys (and the closest one).
"""
from __future__ import annotations

import copy
import difflib
import functools
import importlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message lists every problem."""


class Strict(BaseModel):
    # strict: no silent coercion (``true`` is not 1, ``"3"`` is not 3); ints are still accepted for floats
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


def _list_to_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


#: fixed-length float tuples as YAML writes them (a list: YAML has no tuples; strict mode alone refuses lists)
FloatPair = Annotated[tuple[float, float], BeforeValidator(_list_to_tuple)]
FloatQuad = Annotated[tuple[float, float, float, float], BeforeValidator(_list_to_tuple)]


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
    #: ``auto`` runs in this process when one worker is asked for or the work is small (fewer than
    #: ``local_below`` images on the local machine: starting Ray costs about 10 s), else fans out with Ray; ``ray``
    #: always fans out; ``local`` always runs in this process. A cluster ``address`` always uses Ray
    executor: Literal["auto", "ray", "local"] = "auto"
    #: with ``executor: auto`` on this machine: fewer images than this run in this process
    local_below: int = Field(default=48, ge=0)
    #: number of worker actors (each loads its model once)
    num_workers: int = Field(default=2, ge=1)
    #: images per task / per written cache part
    batch_size: int = Field(default=8, ge=1)
    #: GPUs per actor where CUDA exists (0 = CPU)
    num_gpus: float = Field(default=0.0, ge=0)
    #: CPUs per actor
    num_cpus: float = Field(default=1.0, gt=0)
    #: tries per batch when it fails for reasons outside its images (worker died, disk full, node lost); then the
    #: run fails (exit 1) and leaves those images for the next run
    max_attempts: int = Field(default=3, ge=1)
    #: first retry after this many seconds, doubling per try
    backoff_s: float = Field(default=1.0, ge=0)
    #: batches queued per actor (bounds the driver's futures: a 100k-image run holds a handful, not 100k)
    in_flight_per_worker: int = Field(default=2, ge=1)
    #: joining a cluster (``address`` other than local) fails with a clear message after this many seconds
    connect_timeout_s: float = Field(default=60.0, gt=0)
    #: plain progress lines (when stderr is not a terminal) at least this often, and every 5 % of the images
    progress_every_s: float = Field(default=30.0, gt=0)
    #: memory one image may take in a worker (MiB); an image whose estimated working set (its header's size times
    #: the stage's bytes per pixel) is above it is a failed row naming both, never an out-of-memory kill.
    #: None: 80 % of the memory available on the node shared by ``num_workers`` (and of ``ulimit -v``)
    memory_budget_mb: int | None = Field(default=None, ge=1)
    #: where a Ray started by clips4 (``address: local``) keeps its session files (sockets, logs, spilled objects);
    #: None: Ray's default (``$RAY_TMPDIR``, else /tmp/ray). Unix sockets limit the path to about 100 characters
    temp_dir: str | None = None


class S3Config(Strict):
    """S3 / S3-compatible object store (MinIO, Ceph, R2, ...). Unset fields come from the AWS_* environment."""

    #: e.g. ``http://127.0.0.1:9000``; default: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself
    endpoint_url: str | None = None
    #: default: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``
    region: str | None = None
    #: a profile of ~/.aws/config (default: ``AWS_PROFILE``)
    profile: str | None = None
    #: unsigned requests (public buckets)
    anon: bool | None = None
    #: access key id / secret; prefer ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` over writing them here
    key: str | None = None
    secret: str | None = None
    #: any other ``s3fs.S3FileSystem`` keyword arguments
    options: dict[str, Any] = Field(default_factory=dict)


class StorageConfig(Strict):
    """Settings of the object stores behind ``s3://`` cache and dataset roots (see ``clips4.pipeline.storage``)."""

    s3: S3Config = Field(default_factory=S3Config)


class SegmentsParams(Strict):
    #: contour detector, a key of ``clips4.pipeline.contours.CONTOUR_DETECTORS`` (a test keeps them equal).
    #: ``learned`` (the default since it beat ``classical`` on BSDS val, data/contours/MODEL_CARD.md) needs
    #: onnxruntime and falls back to ``classical`` with a warning without it
    detector: Literal["learned", "classical", "hed", "onnx"] = "learned"
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
    #: an image taking longer than this (seconds) is recorded as failed so its batch goes on; 0 = no limit
    item_timeout_s: float = Field(default=600.0, ge=0)


#: backend specs whose code has moved: the old spelling -> the current one. A config, a cache's meta.json or a
#: checkpoint that names the old one keeps working: it is read as the current one (:func:`current_backend_spec`).
MOVED_BACKENDS: dict[str, str] = {"clips4.pipeline.synthetic:make_teacher": "clips4.synthetic:make_teacher"}


def current_backend_spec(spec: Any) -> Any:
    """``spec`` with a moved backend's old spelling replaced by where its code is now (anything else unchanged)."""
    return MOVED_BACKENDS.get(spec, spec) if isinstance(spec, str) else spec


def fingerprinted_backend_spec(spec: Any) -> Any:
    """The spelling a stage fingerprint hashes for ``spec``: a moved backend's *old* one.

    Moving a backend's code changes its name, not what it computes. Hashing the current spelling would give every
    output made before the move a new fingerprint, so they would be computed again (and a config still naming the
    old spelling, which is read as the current one, would no longer find them either). Hashing the old spelling for
    both keeps every existing output where it is and gives both spellings the same one."""
    old = {new: old for old, new in MOVED_BACKENDS.items()}
    return old.get(spec, spec) if isinstance(spec, str) else spec


class ClipParams(Strict):
    #: ``None``/``open_clip`` for open_clip, or ``package.module:Factory`` for any vision-language backend (a moved
    #: backend's old spelling, :data:`MOVED_BACKENDS`, is read as the current one)
    backend: Annotated[str | None, BeforeValidator(current_backend_spec)] = None
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
    #: dense feature variant, a key of ``clips4.pipeline.clip.DENSE_VARIANTS``: maskclip (paper), sclip, clearclip,
    #: naclip
    variant: Literal["maskclip", "sclip", "clearclip", "naclip"] = "maskclip"
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
    # limits checked from the image header before decoding; an image breaking one is recorded as failed
    #: images above this many pixels
    max_pixels: int = Field(default=200_000_000, ge=1)
    #: long side / short side above this (a 3x10000 strip would become a 14x46667 feature grid)
    max_aspect_ratio: float = Field(default=16.0, ge=1)
    #: longest side after the ``clip.short_side`` / ``clip.window`` resize
    max_resized_side: int = Field(default=8192, ge=16)
    #: an image taking longer than this (seconds) is recorded as failed so its batch goes on; 0 = no limit
    item_timeout_s: float = Field(default=600.0, ge=0)
    #: also cache the teacher on this many photometric variants of each image (for ``train.augment.photometric:
    #: teacher``): arrays ``variant_features (h,w,V,D)`` and ``variant_ops (V,13)``; costs V x the CLIP time/space
    photometric_variants: int = Field(default=0, ge=0)
    #: the variants' transforms: ``{jitter: [b,c,s,h], jitter_p, gray_p, blur_p, blur_sigma: [lo,hi],
    #: channel_shuffle_p, invert_p}`` (clips4.pipeline.photometric.PhotometricConfig; empty = SimCLR's set)
    variant_params: dict[str, Any] = Field(default_factory=dict)


class PrototypesParams(Strict):
    #: known classes: a bundled list (voc, context59, cocostuff171), a text file, ``dataset`` (the dataset root's
    #: classes.txt) or ``dataset/<path>`` (a file relative to the dataset root), or None (class-free)
    classes: str | None = "voc"
    #: known prototype = mean of the top-m segments by class probability (paper: 32)
    top_m: int = Field(default=32, ge=1)
    #: number of unknown prototypes (paper: 64)
    n_unknown: int = Field(default=64, ge=0)
    #: unknown prototypes are drawn from this fraction of segments least explained by the known classes
    #: (1 = any segment, the paper's uniform draw; class-free runs always draw uniformly)
    unknown_pool: float = Field(default=0.25, gt=0, le=1)
    #: measure the teacher's photometric invariances on this many training images (``invariances.json``, for
    #: ``train.augment.photometric: auto``; clips4.pipeline.invariances); 0 = not measured
    invariance_images: int = Field(default=32, ge=0)
    seed: int = 0


class StageDecl(Strict):
    """A stage as declared in stages.yaml (DVC-like). ``run`` names the code, ``deps`` the upstream stages
    (``dataset`` = the images), ``outs`` what it writes (checked when it writes), ``params`` its parameters."""

    #: ``module:Object`` — a per-image processor class, a whole-dataset builder or an external stage (see
    #: :func:`stage_object`)
    run: str = ""
    deps: list[str] = Field(default_factory=list)
    outs: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)


#: what ``run`` may name
STAGE_KINDS = ("per_image", "builder", "external")


@functools.lru_cache(maxsize=None)
def stage_object(run: str):
    """The object a stage's ``run`` names. It declares ``kind`` (``per_image``: ``Object(params, ctx)`` is a
    processor called on batches of records; ``builder``: ``Object.build(params, deps, out_url) -> [file names]``;
    ``external``: run by its own command, e.g. ``clips4 train``), ``version`` (bumped when its outputs change; it
    enters the fingerprint), ``Params`` (the pydantic params model) and optionally ``preflight(params) -> dict``
    and ``active_deps(params, deps) -> deps`` (deps that only some params use). Raises ConfigError."""
    mod, _, attr = run.partition(":")
    if not mod or not attr:
        raise ConfigError(f"run: {run!r} must be 'package.module:Object'")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"run: {run!r} cannot be imported ({exc})") from None
    missing = [a for a in ("kind", "version", "Params") if not hasattr(obj, a)]
    if missing or obj.kind not in STAGE_KINDS:
        raise ConfigError(f"run: {run!r} is not a stage object (needs kind in {STAGE_KINDS}, version, Params; "
                          f"missing {missing or ['a valid kind']})")
    return obj


class EvaluationDecl(Strict):
    """An evaluation ``clips4 repro`` keeps up to date after training (``evaluations: {NAME: {...}}``): its report
    is ``<reports_root>/NAME`` and is redone when the evaluated run, the split's images or these settings change."""

    #: what to measure: ``language`` (language-driven segmentation, paper 4.3; the split needs ground truth)
    task: Literal["language"] = "language"
    #: the evaluated split of the project's dataset
    split: str = "val"
    #: class names in GT id order (default: the dataset's); ``voc20`` / ``voc21`` pick the VOC protocol
    classes: str | None = None
    #: VOC protocol without ``classes``: 21 = background prompt + 20 objects, 20 = objects only
    voc_mode: Literal[20, 21] = 21
    #: the named run evaluated (default: ``train.name``)
    run: str | None = None


class Config(Strict):
    #: where stage outputs live (local path or fsspec URL)
    cache_root: str = "cache"
    #: where named training runs are published (``<runs_root>/<train.name>/final.pt``; a local folder)
    runs_root: str = "runs"
    #: where the reports of ``evaluations`` are written (``<reports_root>/<name>``; a local folder)
    reports_root: str = "reports"
    #: evaluations ``clips4 repro`` runs after training, by name (none by default)
    evaluations: dict[str, EvaluationDecl] = Field(default_factory=dict)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    stages: dict[str, StageDecl] = Field(default_factory=dict)

    def decl(self, stage: str) -> StageDecl:
        if stage not in self.stages:
            raise ConfigError(f"no stage {stage!r} in the configuration; stages: {', '.join(self.stages) or 'none'}")
        return self.stages[stage]

    def params(self, stage: str) -> BaseModel:
        """The validated params model of ``stage`` (its model's defaults where stages.yaml is silent)."""
        decl = self.decl(stage)
        return stage_object(decl.run).Params.model_validate(decl.params)

    def stage_deps(self, stage: str) -> list[str]:
        """Upstream stages whose outputs ``stage`` reads with its current params (``dataset`` excluded)."""
        decl = self.decl(stage)
        deps = [d for d in decl.deps if d != "dataset"]
        obj = stage_object(decl.run)
        if hasattr(obj, "active_deps"):
            deps = list(obj.active_deps(self.params(stage), deps))
        return deps


def _check_graph(cfg: Config, lines: dict[tuple, str]) -> None:
    """Every stage runs something, its deps exist, and the graph has no cycle."""
    problems = []
    names = list(cfg.stages)
    for name, decl in cfg.stages.items():
        where = lines.get(("stages", name))
        at = f"  [{where}]" if where else ""
        if not decl.run:
            others = [n for n in names if cfg.stages[n].run]
            close = difflib.get_close_matches(name, others, n=1)
            problems.append(f"  stages.{name}: unknown stage (no run: module:Object declared)"
                            + (f" (did you mean {close[0]!r}?)" if close else "") + f"; stages: {', '.join(others)}{at}")
            continue
        try:
            stage_object(decl.run)
        except ConfigError as exc:
            problems.append(f"  stages.{name}.{exc}{at}")
        for d in decl.deps:
            if d != "dataset" and d not in cfg.stages:
                close = difflib.get_close_matches(d, names, n=1)
                problems.append(f"  stages.{name}.deps: unknown dep {d!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; valid: dataset, {', '.join(n for n in names if n != name)}"
                                + (f"  [{lines.get(('stages', name, 'deps'))}]" if lines.get(("stages", name, "deps")) else ""))
    if problems:
        raise ConfigError("invalid stage graph:\n" + "\n".join(problems))
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in cfg.stages[n].deps:
            if d == "dataset":
                continue
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [n, d] if d in path else [n, d]
                raise ConfigError(f"invalid stage graph: a cycle {' -> '.join(dict.fromkeys(cycle)) } -> {d}")
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in names:
        if n not in state:
            visit(n, [])


# ------------------------------------------------------------------------------------------- YAML + lines
class _LineLoader(yaml.SafeLoader):
    """Safe loader that remembers the line of every mapping key (for error messages)."""


#: libyaml's safe loader where PyYAML was built with it: ~8x faster (every command reads stages.yaml and its
#: overlays); a document it refuses is read again by the pure-Python one, whose message shows the line and a caret
_FastLoader = getattr(yaml, "CSafeLoader", _LineLoader)


#: a config file larger than this is refused before it is parsed (stages.yaml is a few KiB)
MAX_CONFIG_BYTES = 1 << 20
#: at most this many YAML nodes after alias expansion (a real config has hundreds; a "billion laughs" file of
#: nested aliases expands a 1 KiB text to 10^9 nodes)
MAX_YAML_NODES = 100_000


def _check_expansion(node, source: str) -> None:
    """Refuse a node graph whose alias expansion exceeds :data:`MAX_YAML_NODES` or that refers to itself.
    Sizes are memoised per shared node, so the check costs the number of distinct nodes, not their expansion."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to the node that contains it (recursive alias)")
        active.add(key)
        total = 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > MAX_YAML_NODES:
                    break
        elif isinstance(n, yaml.SequenceNode):
            for v in n.value:
                total += size(v)
                if total > MAX_YAML_NODES:
                    break
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"{source}: YAML aliases expand to more than {MAX_YAML_NODES} nodes; refused (a config "
                              "needs a few hundred: write the values out, or use fewer nested aliases)")
        sizes[key] = total
        return total

    size(node)


def _safe_yaml(text: str, source: str) -> tuple[Any, Any]:
    """(node, data) of one YAML document, safely: size and alias expansion are bounded before anything is built."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} bytes, above the limit of {MAX_CONFIG_BYTES} for a config; refused")
    for cls in dict.fromkeys((_FastLoader, _LineLoader)):
        loader = cls(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _check_expansion(node, source)
            return node, loader.construct_document(node)
        except yaml.YAMLError:
            if cls is _LineLoader:
                raise
        finally:
            loader.dispose()


def _load_with_lines(text: str, source: str) -> tuple[Any, dict[tuple, str]]:
    lines: dict[tuple, str] = {}
    node, data = _safe_yaml(text, source)
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
    return data, lines


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` laid over ``base`` (a copy): mappings merged key by key, anything else replaced; how config
    files layer."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
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


def parse_override(item: str, stage_names=()) -> tuple[list[str], Any]:
    """``'segments.ucm_threshold=0.3'`` → (['stages','segments','params','ucm_threshold'], 0.3)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected PATH=VALUE, e.g. segments.ucm_threshold=0.3")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty path")
    try:
        value = _safe_yaml(raw, f"--set {key.strip()}")[1] if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    if parts[0] in stage_names and (len(parts) == 1 or parts[1] not in ("run", "params", "deps", "outs")):
        parts = ["stages", parts[0], "params", *parts[1:]]
    return parts, value


def _allowed_keys(model: type[BaseModel] | None) -> list[str]:
    return sorted(model.model_fields) if model is not None else []


def _model_at(path: tuple, merged: dict | None = None) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``path`` (for 'valid keys' hints)."""
    model: Any = Config
    i = 0
    while i < len(path):
        key = path[i]
        if model is Config and key == "stages":
            if i + 1 < len(path):
                stage = path[i + 1]
                if i + 2 < len(path) and path[i + 2] == "params":
                    run = ((merged or {}).get("stages", {}).get(stage) or {}).get("run", "")
                    try:
                        model = stage_object(run).Params if run else None
                    except ConfigError:
                        model = None
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


def _format_errors(err: ValidationError, lines: dict[tuple, str], prefix: tuple = (), merged: dict | None = None) -> str:
    msgs = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        where = lines.get(loc) or next((lines[loc[:j]] for j in range(len(loc) - 1, 0, -1) if loc[:j] in lines), None)
        dotted = ".".join(str(p) for p in loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(_model_at(loc[:-1], merged))
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + (
                f"; valid keys: {', '.join(allowed)}" if allowed else ""
            )
        elif e["type"] == "literal_error":
            import re

            choices = re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", "")))
            close = difflib.get_close_matches(str(e.get("input")), choices, n=1)
            msg = f"{msg} (got {e.get('input')!r}" + (f"; did you mean {close[0]!r}?)" if close else ")")
        msgs.append(f"  {dotted}: {msg}" + (f"  [{where}]" if where else ""))
    return "\n".join(msgs)


def bundled_stages_yaml() -> Path:
    """The stages.yaml shipped with the package (a copy of the project's; used where no stages.yaml is found)."""
    from importlib import resources

    return Path(str(resources.files("clips4.data").joinpath("stages.yaml")))


def bundled_configs() -> dict[str, Path]:
    """Name -> path of the config layers shipped with the package (``clips4.data/configs``: ``paper``,
    ``synthetic``), so ``--config paper`` works from any directory."""
    from importlib import resources

    root = Path(str(resources.files("clips4.data").joinpath("configs")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def _config_file(c: str | Path) -> Path:
    """``--config`` value -> file: an existing path, else the name of a bundled config (a file wins)."""
    p = Path(c)
    if p.is_dir():
        raise ConfigError(f"config file {c} is a folder, not a YAML file")
    if p.is_file() or p.exists() or p.suffix or len(p.parts) > 1:
        return p
    bundled = bundled_configs()
    if str(c) in bundled:
        return bundled[str(c)]
    raise ConfigError(f"config file {c} not found (and not a bundled config: {', '.join(bundled)})")


def _read_config_text(f: Path) -> str:
    """The text of config file ``f``; a folder, a missing, unreadable, non-UTF-8 or oversized file is a
    :class:`ConfigError` that says which."""
    import stat

    try:
        st = f.stat()
    except FileNotFoundError:
        raise ConfigError(f"config file {f} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {f}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"config file {f} is a folder, not a YAML file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        raise ConfigError(f"config file {f} is not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {f}: {st.st_size} bytes, above the limit of {MAX_CONFIG_BYTES} for a "
                          "config; refused")
    try:
        with open(f, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # a device (/dev/zero) has no size: read at most the limit
    except OSError as exc:
        raise ConfigError(f"config file {f}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {f}: above the limit of {MAX_CONFIG_BYTES} bytes for a config; refused")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {f} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


#: the project config in the working directory, layered over stages.yaml by every command (before --config files)
PROJECT_CONFIG = "clips4.yaml"


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
    """Resolve and validate the configuration (see module docstring). Raises ``ConfigError``.

    The stage graph comes from ``stages_file``, else the nearest ``stages.yaml`` (with ``search``), else the one
    bundled with the package. With ``search``, a ``clips4.yaml`` in the working directory (the project's config:
    dataset, cache root, every stage's params) is layered over it, before the ``configs``."""
    merged: dict = {}
    lines: dict[tuple, str] = {}
    files: list[Path] = []
    if stages_file is not None:
        files.append(Path(stages_file))
    elif search and (found := find_stages_yaml()) is not None:
        files.append(found)
    else:
        files.append(bundled_stages_yaml())
    project = Path.cwd() / PROJECT_CONFIG
    if search and project.is_file() and not any(Path(c).resolve() == project.resolve() for c in configs or []
                                                 if Path(c).is_file()):
        files.append(project)  # the project's settings, read by every command (like DVC's params.yaml)
    files += [_config_file(c) for c in configs or []]
    for i, f in enumerate(files):
        text = _read_config_text(f)
        if i >= len(files) - len(configs or []) and not text.strip():  # a --config that says nothing (/dev/null)
            raise ConfigError(f"config file {f} is empty")
        try:
            data, file_lines = _load_with_lines(text, str(f))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{f}: not valid YAML: {exc}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{f}: top level must be a mapping, got {type(data).__name__}")
        merged = deep_merge(merged, data)
        lines.update(file_lines)
    for item in overrides or []:
        path, value = parse_override(item, tuple((merged.get("stages") or {}).keys()))
        _set_path(merged, path, value)
        lines[tuple(path)] = f"--set {item}"
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError("invalid configuration:\n" + _format_errors(err, lines, merged=merged)) from None
    _check_graph(cfg, lines)
    # validate each stage's params now, so a typo fails before any work starts
    problems = []
    for name, decl in cfg.stages.items():
        try:
            stage_object(decl.run).Params.model_validate(decl.params)
        except ValidationError as err:
            problems.append(_format_errors(err, lines, ("stages", name, "params"), merged))
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))
    _resolve_dataset_classes(cfg)
    _apply_storage(cfg)
    return cfg


def _apply_storage(cfg: Config) -> None:
    """Check that the cache and dataset URLs can be opened here, and apply the storage settings to fsspec
    (in this process and the processes it starts; see ``clips4.pipeline.storage``)."""
    from clips4.pipeline import storage

    urls = [(cfg.cache_root, "cache_root")] + ([(cfg.dataset.root, "dataset.root")] if cfg.dataset.root else [])
    try:
        for url, key in urls:
            storage.check_url(url, key)
        storage.configure(cfg.storage)  # the buckets are checked with the configured endpoint and credentials
        for url, key in urls:
            storage.check_bucket(url, key)
    except storage.StorageError as exc:
        raise ConfigError(str(exc)) from None


def _resolve_dataset_classes(cfg: Config) -> None:
    """``prototypes.classes: dataset`` = the dataset's own ``classes.txt``; ``dataset/<path>`` = a file relative to
    the dataset root. Resolved here, so the list follows ``--root`` (and the fingerprint names the real file)."""
    decl = cfg.stages.get("prototypes")
    classes = decl.params.get("classes") if decl is not None else None
    if not isinstance(classes, str) or not (classes == "dataset" or classes.startswith("dataset/")):
        return
    if not cfg.dataset.root:
        raise ConfigError(f"prototypes.classes: {classes!r} needs a dataset root (set dataset.root or --root)")
    rel = classes[len("dataset/"):] if classes.startswith("dataset/") else "classes.txt"
    decl.params["classes"] = cfg.dataset.root.rstrip("/") + "/" + rel


def flat_params(d: dict, prefix: str = "") -> dict:
    """``{"clip": {"model": "x"}}`` -> ``{"clip.model": "x"}`` (dotted keys, as ``--set`` spells them)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolved_dict(cfg: Config) -> dict:
    """The fully resolved configuration with every stage's params expanded (saved with every output)."""
    out = cfg.model_dump(mode="json")
    for name in cfg.stages:
        out["stages"][name]["params"] = cfg.params(name).model_dump(mode="json")
    return out
