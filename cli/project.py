"""``clips4 status`` (what is stale and why) and ``clips4 repro`` (bring everything up to date), for the project
that ``stages.yaml`` + ``clips4.yaml`` (+ ``--config`` / ``--set`` / options) describe.

Exit codes of ``status``: 0 every stage up to date, 1 a stage is stale or missing, 3 a stage is being written by
another run (and nothing is stale), 2 a usage or config error. ``repro`` exits like the commands it runs: 0 done,
1 a stage failed (or more images failed than ``--max-failures``), 2 usage/config, 3 locked, 130/143 interrupted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from clips4.cli.common import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, CLIError, Common, common_options, console, option

STATE_STYLE = {"up-to-date": "green", "stale": "yellow", "missing": "yellow", "running": "cyan"}


def _train_extras(cfg, dataset):
    """(urls, extra checks) for the train stage: a fixed ``train.out`` folder, and the named run that a finished
    training is published as (``runs/<train.name>`` holding another fingerprint is stale)."""
    if "train" not in cfg.stages:
        return {}, {}
    p = cfg.params("train")
    urls = {"train": str(p.out)} if p.out else {}

    def published(st):
        if not st.up_to_date or p.out:
            return st
        doc = Path(cfg.runs_root) / p.name / "run.json"
        try:
            fp = json.loads(doc.read_text()).get("fingerprint")
        except (OSError, ValueError):
            fp = None
        if fp != st.fingerprint:
            st.state = "stale"
            st.reasons = [f"the finished run is not published as {doc.parent}"
                          + (f" (it holds run {fp})" if fp else "") + ": `clips4 repro` or `clips4 train` publishes it"]
        return st

    return urls, {"train": published}


def _status(cfg, until: str | None = None):
    from clips4.pipeline.stage import dataset_from_config
    from clips4.pipeline.status import project_status

    dataset = dataset_from_config(cfg)
    urls, extra = _train_extras(cfg, dataset)
    states = project_status(cfg, dataset, until, urls, extra)
    if until is None and "train" in cfg.stages:
        train = next(s for s in states if s.stage == "train")
        states += [_evaluation_status(cfg, name, train) for name in cfg.evaluations]
    return dataset, states


# ------------------------------------------------------------------------------------------------ evaluations
def _evaluation_identity(cfg, name: str) -> tuple[dict, Path]:
    """(what an evaluation's report must have been made from, its folder): the evaluated run's fingerprint, the
    settings, and a digest of the evaluated split's images (ids and file signatures)."""
    import hashlib

    from clips4.evaluate.sources import with_split
    from clips4.pipeline.datasets import source_signature
    from clips4.pipeline.stage import dataset_from_config

    decl = cfg.evaluations[name]
    run = Path(cfg.runs_root) / (decl.run or cfg.params("train").name)
    try:
        run_fp = json.loads((run / "run.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        run_fp = None
    ds = dataset_from_config(with_split(cfg, decl.split))
    images = hashlib.sha256(json.dumps([(r.image_id, source_signature(r.path)) for r in ds.records()]).encode())
    return ({"run": str(run), "run_fingerprint": run_fp, "settings": decl.model_dump(mode="json"),
             "images": images.hexdigest()[:16], "n_images": len(ds.records())}, Path(cfg.reports_root) / name)


def _evaluation_status(cfg, name: str, train):
    from clips4.pipeline.status import MISSING, STALE, StageStatus

    ident, out = _evaluation_identity(cfg, name)
    st = StageStatus(f"evaluate:{name}", "up-to-date", url=str(out))
    try:
        before = json.loads((out / "results.json").read_text()).get("evaluated") or {}
    except (OSError, ValueError):
        before = None
    if not train.up_to_date:
        st.state, st.reasons = STALE, [f"upstream train is {train.state}: the evaluated run will change"]
    elif ident["run_fingerprint"] is None:
        st.state, st.reasons = MISSING, [f"no published run {ident['run']}"]
    elif before is None:
        st.state, st.reasons = MISSING, ["never run"]
    elif before != ident:
        st.state = STALE
        st.reasons = [why for key, why in (("run_fingerprint", f"the run {ident['run']} was retrained"),
                                           ("settings", "its settings changed"),
                                           ("images", f"the '{ident['settings']['split']}' images changed"))
                      if before.get(key) != ident[key]] or ["made by another version"]
    return st


def _run_evaluation(cfg, name: str, opts: Common) -> dict:
    """One evaluation of ``cfg.evaluations`` into ``<reports_root>/<name>`` (results.json records its identity)."""
    from clips4.evaluate.language import run_language
    from clips4.evaluate.sources import with_split
    from clips4.pipeline.stage import dataset_from_config

    decl = cfg.evaluations[name]
    ident, out = _evaluation_identity(cfg, name)
    ecfg = with_split(cfg, decl.split)
    try:
        res = run_language(ecfg, dataset_from_config(ecfg), model=ident["run"], classes=decl.classes,
                           voc_mode=decl.voc_mode, out=out)
    except ValueError as exc:
        raise CLIError(f"evaluation {name!r}: {exc}") from None
    doc = json.loads((out / "results.json").read_text())
    doc["evaluated"] = ident
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    console.print(f"evaluate:{name}: mIoU {100 * res['miou']:.1f} on {res['n_images']} '{decl.split}' images "
                  f"({res['protocol']}); report {out}/report.md", markup=False)
    return {"out": str(out), "miou": res["miou"], "protocol": res["protocol"], "exit_code": EXIT_OK, "committed": True}


def _print(states) -> None:
    for st in states:
        style = STATE_STYLE.get(st.state, "white")
        console.print(f"[bold]{st.stage}[/]: [{style}]{st.state}[/]" + (f" ({st.reasons[0]})" if len(st.reasons) == 1 else ""))
        if len(st.reasons) > 1:
            for r in st.reasons:
                console.print(f"  - {r}", markup=False)
        console.print(f"  {st.url}", markup=False, style="dim")


def _until(cfg, until: Optional[str]) -> Optional[str]:
    if until is None:
        return None
    name = until.replace("-", "_")
    if name not in cfg.stages:
        raise CLIError(f"--until {until!r}: no such stage; stages: {', '.join(s.replace('_', '-') for s in cfg.stages)}")
    return name


@common_options("status", stage="train")
def status(
    opts: Common,
    until: Optional[str] = option("until"),
) -> dict:
    """Every stage of the project with its state: up to date, stale (and why: which params, which images, which
    upstream), missing, or running (and who holds it). Exit 0 up to date, 1 stale or missing, 3 running."""
    cfg = opts.build_config()
    dataset, states = _status(cfg, _until(cfg, until))
    console.print(f"project: dataset {dataset.key} ({dataset.root}, {len(dataset.records())} images), cache {cfg.cache_root}",
                  markup=False)
    _print(states)
    stale = [s.stage for s in states if s.state in ("stale", "missing")]
    running = [s.stage for s in states if s.state == "running"]
    code = EXIT_FAILED if stale else EXIT_LOCKED if running else EXIT_OK
    console.print("up to date" if code == EXIT_OK else
                  f"stale: {', '.join(stale)} (`clips4 repro` brings them up to date)" if stale else
                  f"running: {', '.join(running)}")
    return {"dataset": dataset.describe(), "up_to_date": code == EXIT_OK, "stale": stale, "running": running,
            "stages": [s.to_dict() for s in states], "exit_code": code}


@common_options("repro", stage="train")
def repro(
    opts: Common,
    until: Optional[str] = option("until", help="Stop after this stage (it and the stages it needs)."),
    dry_run: bool = option("dry_run", help="Only say which stages would run, and why."),
    max_failures: int = option("max_failures"), retry_failed: bool = option("retry_failed"),
    wait: bool = option("wait"), wait_timeout: Optional[float] = option("wait_timeout"),
) -> dict:
    """Run every stale stage in graph order (segments, clip-features, prototypes, train, then the config's
    evaluations), each exactly as its own command would: per-image stages process only new or changed images,
    whole-dataset stages are rebuilt when what they are built from changed, a finished training is published as
    runs/NAME, an evaluation is redone when its run or images changed. One cron line keeps a project up to date:
    `clips4 repro --json`."""
    from clips4.pipeline.stage import dataset_from_config
    from clips4.pipeline.status import check_damage, graph_order, stage_status

    cfg = opts.build_config()
    order = graph_order(cfg, _until(cfg, until))
    dataset = dataset_from_config(cfg)
    urls, extra = _train_extras(cfg, dataset)
    done: dict = {}
    report, code = [], EXIT_OK
    for name in order:
        st = check_damage(stage_status(cfg, name, dataset, done, urls.get(name)))
        if name in extra:
            st = extra[name](st)
        entry = {"stage": name, "state": st.state, "reasons": st.reasons}
        if st.up_to_date:
            console.print(f"[bold]{name}[/]: [green]up to date[/]" + (f" ({'; '.join(st.reasons)})" if st.reasons else ""))
            entry["action"] = "none"
        elif dry_run:
            console.print(f"[bold]{name}[/]: would run ({'; '.join(st.reasons) or st.state})")
            entry["action"] = "would-run"
        elif st.state == "running" and not wait:
            console.print(f"[bold]{name}[/]: [cyan]running[/] ({st.reasons[0]}); stopping here (--wait waits for it)")
            entry["action"], code = "locked", EXIT_LOCKED
            report.append(entry)
            break
        else:
            console.print(f"[bold]{name}[/]: running ({'; '.join(st.reasons) or st.state})")
            entry["action"] = "ran"
            entry["summary"] = _run(cfg, name, opts, max_failures=max_failures, retry_failed=retry_failed, wait=wait,
                                    wait_timeout=wait_timeout)
            sub = int(entry["summary"].pop("exit_code", 0))
            entry["exit_code"] = sub
            if sub and sub != EXIT_FAILED or sub == EXIT_FAILED and not entry["summary"].get("committed", False):
                code = sub
                report.append(entry)
                console.print(f"repro: stopped at {name} (exit {sub}); later stages were not run")
                break
            if sub:  # a per-image stage committed, with more failed images than allowed: later stages still run
                code = sub
            st = stage_status(cfg, name, dataset, done, urls.get(name))
            if name in extra:
                st = extra[name](st)
        done[name] = st if not dry_run or st.up_to_date else _assume_stale(st)
        report.append(entry)
    if until is None and code == EXIT_OK and "train" in done:
        for name in cfg.evaluations:
            st = _evaluation_status(cfg, name, done["train"])
            entry = {"stage": st.stage, "state": st.state, "reasons": st.reasons}
            if st.up_to_date:
                console.print(f"[bold]{st.stage}[/]: [green]up to date[/]")
                entry["action"] = "none"
            elif dry_run:
                console.print(f"[bold]{st.stage}[/]: would run ({'; '.join(st.reasons)})")
                entry["action"] = "would-run"
            else:
                console.print(f"[bold]{st.stage}[/]: running ({'; '.join(st.reasons)})")
                entry["action"], entry["summary"] = "ran", _run_evaluation(cfg, name, opts)
                entry["exit_code"] = entry["summary"].pop("exit_code")
            report.append(entry)
    ran = [e["stage"] for e in report if e.get("action") == "ran"]
    would = [e["stage"] for e in report if e.get("action") == "would-run"]
    console.print(("would run: " + (", ".join(would) or "nothing, everything is up to date")) if dry_run else
                  ("ran: " + (", ".join(ran) or "nothing, everything was up to date")))
    return {"dataset": dataset.describe(), "dry_run": dry_run, "stages": report, "ran": ran, "would_run": would,
            "exit_code": code}


def _assume_stale(st):
    """In a dry run a stale stage is not run: its downstream must read it as still stale."""
    st.state = st.state if st.state in ("stale", "missing", "running") else "stale"
    return st


def _run(cfg, name: str, opts: Common, *, max_failures: int, retry_failed: bool, wait: bool,
         wait_timeout: float | None) -> dict:
    """Run one stage as its own command does; the summary dict carries ``exit_code`` and whether it committed."""
    from clips4.pipeline.stage import print_summary, run_stage, stage_def

    kind = stage_def(cfg, name).kind
    if kind == "external":
        if name != "train":
            raise CLIError(f"stage {name!r} is run by its own command, not by repro")
        from clips4.trainer.train import train as run_training

        res = run_training(cfg, resume=True, show_progress=not opts.quiet, wait=wait, wait_timeout=wait_timeout)
        out = {"out": str(res.out), "run": str(res.published) if res.published else None, "step": res.step,
               "stopped": res.stopped, "committed": res.stopped in ("finished", "nothing_to_do")}
        out["exit_code"] = 128 + int(res.signal) if res.stopped == "interrupted" else EXIT_OK
        return out
    run = run_stage(cfg, name, retry_failed=retry_failed, show_progress=not opts.quiet, wait=wait,
                    wait_timeout=wait_timeout)
    code = print_summary(run, max_failures if kind == "per_image" else 0)
    return {**run.to_dict(), "exit_code": code, "committed": True}
