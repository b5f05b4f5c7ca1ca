"""Human output in files and pipes: tables printed whole, and no Ray notice about its own defaults."""
from __future__ import annotations

import logging

from clips4.pipeline.console import RAY_AUTH_LOGGER, make_console


def _summary() -> dict:
    row = {"ODS": {"f": 0.74, "precision": 0.75, "recall": 0.73, "threshold": 0.2}, "OIS": {"f": 0.76},
           "AP": 0.79, "AP_bsds": 0.78, "covering": {"ODS": 0.59, "OIS": 0.66}}
    return {"split": "val", "n_images": 100, "thresholds": 99, "detector": "learned", "contours": row, "ucm": row}


def test_a_piped_boundaries_table_keeps_every_header_and_cell(capsys):
    from clips4.evaluate.boundaries import print_summary

    print_summary(_summary())
    out = capsys.readouterr().out
    assert "…" not in out, out
    for word in ("contours (NMS)", "AP (pyEdgeEval)", "AP (BSDS)", "covering ODS", "covering OIS", "0.790"):
        assert word in out, (word, out)


def test_a_piped_table_wider_than_the_console_is_not_cut(capsys):
    from rich.table import Table

    t = Table(title="wide")
    names = [f"column number {i} with a long header" for i in range(12)]
    for n in names:
        t.add_column(n)
    t.add_row(*[f"/a/long/path/to/value/{i}.zarr" for i in range(12)])
    c = make_console()
    assert c.width < 400  # the table is wider than the plain console
    c.print(t)
    c.rule("done")
    out = capsys.readouterr().out
    assert "…" not in out and all(n in out for n in names) and "/a/long/path/to/value/11.zarr" in out
    assert max(len(line) for line in out.splitlines() if "done" in line) <= c.width  # rules keep the plain width


def test_rays_default_token_auth_notice_is_dropped_and_others_pass(caplog):
    import clips4.pipeline.runner  # noqa: F401 - what every stage imports before it starts Ray

    lg = logging.getLogger(RAY_AUTH_LOGGER)
    with caplog.at_level(logging.INFO, logger=RAY_AUTH_LOGGER):  # Ray may have set its loggers' levels already
        lg.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        lg.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        lg.info("Generated new authentication token and saved to /x")
    msgs = [r.getMessage() for r in caplog.records if r.name == RAY_AUTH_LOGGER]
    assert not any("is enabled" in m for m in msgs), msgs
    assert any("is disabled" in m for m in msgs) and any("Generated" in m for m in msgs), msgs
