"""Where caches and datasets live: fsspec URLs (local paths, ``file://``, ``s3://`` on any S3-compatible store).

Every module opens files through ``fsspec.core.url_to_fs(url)`` / ``fsspec.open(url)`` and Zarr through a URL
string, so storage settings are applied once, globally, as fsspec's per-protocol defaults
(``fsspec.config.conf["s3"]``), instead of being threaded through every call. They are also exported as the
``FSSPEC_S3`` environment variable, which fsspec reads at import, so that processes started later (Ray workers
on this machine, DataLoader workers, torchrun ranks) open the same endpoint with the same credentials.

S3 settings come from, in order of precedence:

1. the ``storage.s3`` section of the config (``endpoint_url``, ``region``, ``profile``, ``anon``,
   ``key``/``secret`` – prefer the environment for secrets – and free ``options`` passed to ``s3fs``);
2. the usual environment variables, read by botocore itself: ``AWS_ACCESS_KEY_ID``,
   ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``;
   ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` are read here as well (older botocore ignores them).

``s3fs`` is an optional dependency (``pip install -e ".[s3]"``); an ``s3://`` URL without it is a
:class:`StorageError` naming the URL and the install command, checked when the configuration is loaded.
"""
from __future__ import annotations

import json
import os
from typing import Any

#: protocol -> (module that implements it, extra that installs it)
_OPTIONAL = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", None), "gcs": ("gcsfs", None),
             "az": ("adlfs", None), "abfs": ("adlfs", None)}


class StorageError(ValueError):
    """A storage URL cannot be used here (unknown protocol, missing driver); the message says why and how."""


def protocol(url: str) -> str:
    """``'s3'`` for ``s3://bucket/x``, ``'file'`` for local paths and ``file://`` URLs."""
    url = str(url)
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower() or "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def check_url(url: str, what: str = "URL") -> None:
    """Fail early and clearly when ``url``'s protocol has no filesystem implementation installed."""
    import fsspec

    proto = protocol(url)
    if proto in ("file", "local"):
        return
    module, extra = _OPTIONAL.get(proto, (None, None))
    try:
        fsspec.get_filesystem_class(proto)
    except ValueError:
        raise StorageError(f"{what} {url!r}: unknown storage protocol {proto!r}; use a local path, file:// or s3://") from None
    except ImportError:
        how = f'pip install -e ".[{extra}]"  (or: pip install {module})' if extra else f"pip install {module or proto}"
        raise StorageError(f"{what} {url!r} needs the {module or proto} package, which is not installed: {how}") from None


def makedirs(fs, path: str) -> None:
    """``fs.makedirs(path, exist_ok=True)`` where folders exist (local disks). Object stores have no folders, and
    s3fs's makedirs creates a missing *bucket*: clips4 never creates buckets, so there it does nothing."""
    proto = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in proto or "local" in proto:
        fs.makedirs(path, exist_ok=True)


def check_bucket(url: str, what: str = "URL") -> None:
    """For an object-store URL: fail clearly when its bucket does not exist or the store cannot be reached (a
    missing bucket is never created)."""
    proto = protocol(url)
    if proto not in ("s3", "s3a", "gs", "gcs"):
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    bucket = path.split("/", 1)[0]
    where = fs.storage_options.get("endpoint_url") or (fs.storage_options.get("client_kwargs") or {}).get(
        "endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or proto
    exists = True
    try:
        if hasattr(fs, "call_s3"):  # one HEAD request; s3fs's exists() says False when the store is unreachable
            fs.call_s3("head_bucket", Bucket=bucket)
        else:
            exists = fs.exists(bucket)
    except FileNotFoundError:
        exists = False
    except PermissionError:  # the bucket exists; whether it may be written is seen on the first write
        pass
    except Exception as exc:  # noqa: BLE001 - botocore's connection errors are not OSErrors
        raise StorageError(f"{what} {url!r}: cannot reach the object store at {where} "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not exists:
        raise StorageError(f"{what} {url!r}: bucket {bucket!r} does not exist at {where}; create it first "
                           "(clips4 never creates buckets)")


def s3_options(section: Any | None = None, environ: dict | None = None) -> dict:
    """``s3fs.S3FileSystem`` keyword arguments from a ``storage.s3`` config section and the environment."""
    env = os.environ if environ is None else environ
    get = (lambda k: getattr(section, k, None)) if section is not None else (lambda k: None)
    opts: dict[str, Any] = dict(get("options") or {})
    client: dict[str, Any] = dict(opts.pop("client_kwargs", {}) or {})
    endpoint = get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    for name in ("key", "secret", "profile", "anon"):
        v = get(name)
        if v is not None:
            opts[name] = v
    return opts


_applied: dict | None = None  # the options this module put in fsspec's config (None: it put none)


def configure(storage: Any | None = None, *, export: bool = True) -> dict:
    """Apply the storage settings (a ``StorageConfig`` or None = environment only) to fsspec, in this process
    and (``export``) in processes started from it. Returns the S3 options in force. Idempotent. With nothing
    configured, settings someone else gave fsspec (``FSSPEC_S3``, ~/.config/fsspec) are left alone."""
    global _applied
    import fsspec.config

    opts = s3_options(getattr(storage, "s3", None) if storage is not None else None)
    if opts == (_applied or {}):
        return opts
    if opts:
        fsspec.config.conf["s3"] = opts
        if export:
            os.environ["FSSPEC_S3"] = json.dumps(opts, sort_keys=True)
    elif _applied is not None:  # settings of an earlier configuration in this process
        fsspec.config.conf.pop("s3", None)
        os.environ.pop("FSSPEC_S3", None)
    _applied = opts or None
    _clear_instances("s3")
    return opts


def worker_env() -> dict[str, str]:
    """Environment variables a process on another machine needs to reach the same storage (e.g. for a Ray
    ``runtime_env={"env_vars": ...}``): ``FSSPEC_S3`` and the AWS variables set here."""
    keys = ("FSSPEC_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _clear_instances(proto: str) -> None:
    """Drop cached filesystem instances of ``proto`` (they hold the old endpoint/credentials)."""
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError):
        return
    clear = getattr(cls, "clear_instance_cache", None)
    if clear is not None:
        clear()
