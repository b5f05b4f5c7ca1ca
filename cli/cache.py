"""``clips4 cache ls``: what the caches hold."""
from __future__ import annotations

import typer

from clips4.cli.common import Common, common_options, console

app = typer.Typer(help="Inspect the stage caches.", no_args_is_help=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@app.command("ls")
@common_options("cache ls", dataset=False)
def ls(
    opts: Common,
    params: bool = typer.Option(False, "--params", help="Show every stage's params in full."),
) -> dict:
    """List stage outputs: dataset, stage, fingerprint, state, image counts, size and params."""
    from rich.table import Table

    from clips4.pipeline.cache import list_stage_outputs

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
        text = ", ".join(f"{k}={v}" for k, v in _flatten(r["params"]).items())
        if not params and len(text) > 200:
            text = text[:197] + "..."
        console.print(f"{r['stage']} {r['fingerprint']}: {text}\n  {r['url']}", markup=False)
    return {"cache_root": cfg.cache_root, "outputs": rows}
