"""``clips4 report RUN…``: several evaluation runs side by side."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clips4.cli.common import Common, common_options, console, option


@common_options("report", dataset=None)
def report(
    opts: Common,
    runs: List[Path] = typer.Argument(..., help="Run folders (or results.json files) to compare."),
    out: Optional[Path] = option("out", help="Also write the Markdown table to this file."),
) -> dict:
    """Show the results of several runs side by side (Markdown table); optionally write it to ``--out``."""
    from rich.markdown import Markdown

    from clips4.evaluate.report import side_by_side

    table = side_by_side(runs)
    console.print(Markdown(table) if console.is_terminal else table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
    return {"out": str(out) if out else None, "table": table}
