"""``clips4 cache ls``: what the caches hold."""
from __future__ import annotations

import typer

from clips4.cli.common import Common, common_options, console, option


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


@common_options("cache ls", dataset=False)
def ls(
    opts: Common,
    params: bool = typer.Option(False, "--params", help="Show every stage's params in full."),
) -> dict:
    """List stage outputs: dataset, stage, fingerprint, state, image counts, size and params."""
    from rich.table import Table

    from clips4.pipeline.cache import list_stage_outputs
    from clips4.pipeline.config import flat_params

    cfg = opts.build_config()
    rows = list_stage_outputs(cfg.cache_root)
    if not rows:
        console.print(f"no stage outputs under {cfg.cache_root}")
        return {"cache_root": cfg.cache_root, "outputs": []}
    table = Table(title=f"stage outputs in {cfg.cache_root}")
    for col in ("dataset", "stage", "fingerprint", "state", "images", "failed", "size", "created"):
        table.add_column(col, no_wrap=col in ("fingerprint", "dataset"))
    for r in rows:
        table.add_row(r["dataset"], r["stage"], r["fingerprint"], r["state"], str(r["images"]), str(r["failed"]),
                      _human(r["bytes"]), r["created"][:16].replace("T", " "))
    console.print(table)
    for r in rows:
        text = ", ".join(f"{k}={v}" for k, v in flat_params(r["params"]).items())
        if not params and len(text) > 200:
            text = text[:197] + "..."
        console.print(f"{r['stage']} {r['fingerprint']}: {text}\n  {r['url']}", markup=False)
    return {"cache_root": cfg.cache_root, "outputs": rows}


@common_options("cache verify", dataset=False)
def verify(
    opts: Common,
    checksums: bool = typer.Option(False, "--checksums", help="Read and hash every file (default: sizes only, fast)."),
    repair: bool = typer.Option(False, "--repair", help="Move damaged parts aside and compute their images again."),
) -> dict:
    """Check every finished stage output against the sizes (and, with --checksums, sha256) recorded when its files
    were written; name each damaged file and the images it holds. Exit 1 while damage remains."""
    from clips4.cli.common import EXIT_FAILED, err_console
    from clips4.pipeline.cache import list_stage_outputs, verify_stage

    cfg = opts.build_config()
    outputs = [r for r in list_stage_outputs(cfg.cache_root) if r["state"] != "incomplete"]
    report, left = [], 0
    for r in outputs:
        problems = verify_stage(r["url"], checksums=checksums)
        entry = {"url": r["url"], "stage": r["stage"], "fingerprint": r["fingerprint"],
                 "problems": [p.to_dict() for p in problems]}
        for p in problems:
            err_console.print(f"damaged: {p.message()}", markup=False)
        if problems and repair:
            entry["repair"] = _repair(cfg, r, problems)
            problems = verify_stage(r["url"], checksums=checksums)
            entry["problems_after_repair"] = [p.to_dict() for p in problems]
        left += len(problems)
        report.append(entry)
    what = "sizes and sha256" if checksums else "sizes"
    if left:
        console.print(f"{left} damaged file(s) in {cfg.cache_root}"
                      + ("" if repair else "; `clips4 cache verify --repair` recomputes the affected images"),
                      markup=False)
    else:
        console.print(f"{len(outputs)} finished stage output(s) in {cfg.cache_root}: {what} as written", markup=False)
    return {"cache_root": cfg.cache_root, "outputs": report, "damaged": left, "exit_code": EXIT_FAILED if left else 0}


def _repair(cfg, row: dict, problems) -> str:
    """Move the damaged parts of one stage output aside (under its lock) and run the stage again with the
    configuration it was made with (how it runs — executor, workers, address — is this invocation's)."""
    import json

    from clips4.cli.common import err_console
    from clips4.pipeline import stage as stage_mod
    from clips4.pipeline.cache import _fs, quarantine_damaged
    from clips4.pipeline.config import Config
    from clips4.pipeline.lock import StageLock

    url, name = row["url"], row["stage"]
    with StageLock(url):
        moved = quarantine_damaged(url, problems)
    err_console.print(f"  moved aside: {len(moved)} file(s) of {name} {row['fingerprint']}", markup=False)
    fs, path = _fs(url)
    with fs.open(f"{path}/meta.json", "r") as f:
        meta = json.load(f)
    cmd = "precompute " + name.replace("_", "-")
    try:
        made = Config.model_validate(meta["config"]).model_copy(update={"ray": cfg.ray})
        dataset = stage_mod.dataset_from_config(made)
        same = stage_mod.stage_url(made, name, dataset)[0].rstrip("/") == url.rstrip("/")
    except Exception as exc:  # noqa: BLE001 - an output made by other code or for data that is gone
        err_console.print(f"  cannot rebuild its configuration ({exc}); run `clips4 {cmd}` with the configuration "
                          "that made it", markup=False)
        return "moved aside"
    if not same:
        err_console.print(f"  its configuration now names another output (code or inputs changed); run `clips4 {cmd}` "
                          "with the configuration that made it", markup=False)
        return "moved aside"
    try:
        run = stage_mod.run_stage(made, name, dataset=dataset, show_progress=False)
    except stage_mod.StageError as exc:  # e.g. a training run: not run by the pipeline
        err_console.print(f"  {exc}; the damaged files are moved aside", markup=False)
        return "moved aside"
    err_console.print(f"  {name}: {run.processed} item(s) computed again", markup=False)
    return f"recomputed {run.processed}"


@common_options("cache gc", stage="train")
def gc(
    opts: Common,
    dry_run: bool = option("dry_run", help="Only list what would be removed."),
) -> dict:
    """Remove the stage outputs of this dataset that neither the current configuration nor a named run
    (runs/*/run.json) refers to: outputs of old params, prototypes and runs built from older image sets. Other
    datasets' folders are not touched; outputs being written (locked) are kept."""
    import json as _json
    from pathlib import Path

    from clips4.pipeline.cache import _du, _fs, url_join
    from clips4.pipeline.lock import lock_holder
    from clips4.pipeline.stage import dataset_from_config, stage_url

    cfg = opts.build_config()
    dataset = dataset_from_config(cfg)
    keep: set[str] = set()
    for name in cfg.stages:
        try:
            keep.add(stage_url(cfg, name, dataset)[0].rstrip("/"))
        except Exception:  # noqa: BLE001 - a stage that cannot be named now keeps nothing
            pass
    runs = sorted(Path(cfg.runs_root).glob("*/run.json")) if Path(cfg.runs_root).is_dir() else []
    for doc in runs:
        try:
            cache = _json.loads(doc.read_text())["cache"]
            keep.add(str(cache).rstrip("/"))
            meta = _json.loads((Path(cache) / "meta.json").read_text())
            keep.update(str(u).rstrip("/") for u in (meta.get("deps") or {}).values())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    fs, root = _fs(url_join(cfg.cache_root, dataset.key))
    norm = lambda u: _fs(u)[1].rstrip("/")  # noqa: E731 - compare paths, however the URL is spelt
    kept = {norm(u) for u in keep}
    removed, sizes = [], 0
    try:
        folders = [p for p in fs.glob(f"{root}/*/*") if fs.isdir(p)]
    except (OSError, FileNotFoundError):
        folders = []
    for d in sorted(folders):
        url = url_join(cfg.cache_root, dataset.key, *d.rstrip("/").split("/")[-2:])
        if d.rstrip("/") in kept or lock_holder(url) is not None:
            continue
        try:
            size = _du(fs, d)
        except Exception:  # noqa: BLE001 - informative only
            size = 0
        removed.append({"url": url, "bytes": size})
        sizes += size
        console.print(f"{'would remove' if dry_run else 'removing'} {url} ({_human(size)})", markup=False)
        if not dry_run:
            fs.rm(d, recursive=True)
    console.print(f"{'would free' if dry_run else 'freed'} {_human(sizes)} in {len(removed)} output(s); kept "
                  f"{len(kept)} referenced by the configuration and {len(runs)} named run(s)")
    return {"removed": removed, "bytes": sizes, "dry_run": dry_run}
