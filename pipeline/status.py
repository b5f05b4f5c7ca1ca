"""What is stale in a project, and why (``clips4 status``, ``clips4 repro``), as DVC's ``status`` does.

Every stage of the graph gets one state:

- ``up-to-date``: its output for this configuration and these inputs is committed (a per-image stage: every
  selected image is processed and unchanged since; failed images are counted, not retried);
- ``stale``: it would compute something else now — which params differ from its last finished output, how many
  images were added / changed, which upstream is stale, or an unfinished (interrupted) run to continue;
- ``missing``: never run for this dataset;
- ``running``: another process holds its lock (named).

A whole-dataset stage (prototypes, train) is stale while an upstream is not up to date: what it would be built from
is going to change.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from clips4.pipeline.cache import INDEX, _fs, read_parquet, url_join
from clips4.pipeline.config import Config
from clips4.pipeline.datasets import Dataset, source_signature
from clips4.pipeline.lock import lock_holder
from clips4.pipeline.stage import (describe_input_change, finished_outputs, identity_params, input_rows, param_diff,
                                   read_input_rows, stage_def, stage_url)

UP_TO_DATE, STALE, MISSING, RUNNING = "up-to-date", "stale", "missing", "running"


@dataclass
class StageStatus:
    stage: str
    state: str
    #: why it is not up to date (or facts about an up-to-date one, e.g. failed images)
    reasons: list[str] = field(default_factory=list)
    url: str = ""
    fingerprint: str = ""
    #: per-image stages: images to process on the next run, images failed in the cache
    todo: int = 0
    failed: int = 0
    #: the lock holder of a running stage
    holder: dict | None = None

    @property
    def up_to_date(self) -> bool:
        return self.state == UP_TO_DATE

    def to_dict(self) -> dict:
        return asdict(self)


def graph_order(cfg: Config, until: str | None = None) -> list[str]:
    """The stages in dependency order (stages.yaml's graph); with ``until``, that stage and what it needs."""
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        for d in cfg.decl(n).deps:
            if d != "dataset":
                visit(d)
        order.append(n)

    for n in ([until] if until else list(cfg.stages)):
        visit(n)
    return order


def _exists(url: str) -> bool:
    fs, path = _fs(url)
    try:
        return fs.exists(path)
    except OSError:
        return False


def stage_status(cfg: Config, name: str, dataset: Dataset, upstream: dict[str, StageStatus] | None = None,
                 url: str | None = None) -> StageStatus:
    """The state of stage ``name`` (see the module docstring). ``upstream``: the states already computed for its
    deps (a whole-dataset stage is stale while one of them is not up to date). ``url``: where its output lives
    when not in its fingerprint folder (e.g. a fixed ``train.out``)."""
    upstream = upstream or {}
    kind = stage_def(cfg, name).kind
    waiting = [d for d in cfg.stage_deps(name) if d in upstream and not upstream[d].up_to_date]
    missing_up = [d for d in waiting if upstream[d].state == MISSING]
    own_url, fp, _ = stage_url(cfg, name, dataset)
    url = url or own_url
    st = StageStatus(name, UP_TO_DATE, url=url, fingerprint=fp)
    holder = lock_holder(url)
    if holder is not None:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
        st.state, st.holder, st.reasons = RUNNING, holder, [f"being written by {who}"]
        return st
    if kind == "per_image":
        return _per_image_status(cfg, name, dataset, st, waiting)
    if _exists(url_join(url, INDEX)) and not waiting:
        if url != own_url:  # a fixed folder (train.out): is what it holds this configuration's output?
            meta = _meta(url)
            if meta.get("fingerprint") not in (None, fp):
                st.state = STALE
                st.reasons = describe_input_change(read_input_rows(url), input_rows(cfg, name, dataset)) or [
                    f"it holds output {meta.get('fingerprint')} of other params (this configuration: {fp})"]
        return st
    if missing_up:
        st.state, st.reasons = MISSING, [f"needs {', '.join(missing_up)} (not run yet)"]
        return st
    if waiting:
        st.state = STALE
        st.reasons = [f"upstream {d} is {upstream[d].state}: what it is built from will change" for d in waiting]
        here = _no_op(cfg, name, identity_params(cfg, name))
        same = [m for m in finished_outputs(cfg, name, dataset)
                if not param_diff(name, _no_op(cfg, name, m.get("params") or {}), here)]
        if same:
            st.reasons += describe_input_change(read_input_rows(same[0]["url"]), input_rows(cfg, name, dataset))
        return st
    return _explain(cfg, name, dataset, st)


def _per_image_status(cfg: Config, name: str, dataset: Dataset, st: StageStatus, waiting: list[str]) -> StageStatus:
    records = dataset.records()
    held: dict[str, tuple[str, str]] = {}
    if _exists(url_join(st.url, INDEX)):
        t = read_parquet(url_join(st.url, INDEX), columns=["image_id", "source_sig", "status"])
        held = {i: (sig, s) for i, sig, s in zip(t["image_id"].to_pylist(), t["source_sig"].to_pylist(),
                                                t["status"].to_pylist())}
    elif _exists(st.url):
        st.state, st.reasons = STALE, ["an unfinished run (interrupted, no index yet): a rerun continues from its parts"]
        st.todo = len(records)
        return st
    else:
        st = _explain(cfg, name, dataset, st)
        st.todo = len(records)
        return st
    new = changed = failed = 0
    for r in records:
        h = held.get(r.image_id)
        if h is None:
            new += 1
        elif h[0] != source_signature(r.path):
            changed += 1
        elif h[1] != "ok":
            failed += 1
    st.todo, st.failed = new + changed, failed
    if new or changed:
        st.state = STALE
        st.reasons = [", ".join(f"{n} {what}" for n, what in ((new, "new image" + ("s" if new != 1 else "")),
                                                              (changed, "changed image" + ("s" if changed != 1 else "")))
                                if n) + " to process"]
    if failed:
        st.reasons.append(f"{failed} image{'s' if failed != 1 else ''} failed (recorded; --retry-failed processes "
                          "them again)")
    for d in waiting:
        st.reasons.append(f"upstream {d} is stale")
    return st


def _meta(url: str) -> dict:
    import json

    fs, path = _fs(url)
    try:
        with fs.open(f"{path}/meta.json", "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _no_op(cfg: Config, name: str, params: dict) -> dict:
    """``params`` without the keys the stage declares operational (they do not make an output stale)."""
    op = getattr(stage_def(cfg, name), "operational", ())
    return {k: v for k, v in params.items() if k not in op}


def _explain(cfg: Config, name: str, dataset: Dataset, st: StageStatus) -> StageStatus:
    """A stage whose output for this configuration is not committed: missing, or stale with what differs from
    its most recent finished output."""
    if _exists(st.url):
        st.state, st.reasons = STALE, ["an unfinished run: the next run continues or rebuilds it"]
        return st
    done = finished_outputs(cfg, name, dataset)
    if not done:
        st.state, st.reasons = MISSING, ["never run for this dataset"]
        return st
    # the closest finished output (fewest differing params; newest first among equals) explains what changed; how
    # a run is carried out (operational keys) is not what makes it stale
    here = _no_op(cfg, name, identity_params(cfg, name))
    diffs = [(param_diff(name, _no_op(cfg, name, dict(m.get("params") or {})), here), m) for m in done]
    diff, last = min(diffs, key=lambda t: len(t[0]))
    st.state = STALE
    if diff:
        st.reasons = [f"params changed: {d}" for d in diff]
        return st
    mine = {d: stage_url(cfg, d, dataset)[1] for d in cfg.stage_deps(name)}
    theirs = {d: (v.get("fingerprint") if isinstance(v, dict) else str(v).rstrip("/").rsplit("/", 1)[-1])
              for d, v in (last.get("deps") or {}).items()}
    moved = [d for d in sorted(mine) if theirs.get(d) != mine[d]]
    reasons = []
    if stage_def(cfg, name).kind != "per_image":
        reasons = describe_input_change(read_input_rows(last["url"]), input_rows(cfg, name, dataset))
    per_image_moved = [d for d in moved if stage_def(cfg, d).kind == "per_image"]
    if per_image_moved and not reasons:
        reasons = [f"upstream {d} is another output now (its params changed)" for d in per_image_moved]
    reasons += [f"upstream {d} was rebuilt" for d in moved if d not in per_image_moved]
    st.reasons = reasons or [f"built by another code version ({last.get('version')} there)"]
    return st


def check_damage(st: StageStatus) -> StageStatus:
    """An output that is committed but has damaged files (sizes checked against what was written; one listing) is
    stale: the next run of the stage recomputes what those files held."""
    if st.state not in (UP_TO_DATE,) or not _exists(url_join(st.url, INDEX)):
        return st
    from clips4.pipeline.cache import verify_stage

    problems = verify_stage(st.url)
    if problems:
        st.state = STALE
        files = ", ".join(p.file.rsplit("/", 1)[-1] for p in problems[:3]) + (" …" if len(problems) > 3 else "")
        st.reasons = [f"{len(problems)} damaged file{'s' if len(problems) != 1 else ''} ({files}): "
                      "`clips4 cache verify --repair` or `clips4 repro` recomputes what they held"] + st.reasons
    return st


def project_status(cfg: Config, dataset: Dataset, until: str | None = None, urls: dict[str, str] | None = None,
                   extra: dict | None = None) -> list[StageStatus]:
    """The state of every stage in graph order (up to ``until``). ``urls``: outputs not in their fingerprint
    folder. ``extra``: ``{stage: fn(StageStatus) -> StageStatus}`` for checks only a stage's owner knows (e.g.
    that a finished training run is also the published named run)."""
    out: dict[str, StageStatus] = {}
    for name in graph_order(cfg, until):
        st = check_damage(stage_status(cfg, name, dataset, out, (urls or {}).get(name)))
        if extra and name in extra:
            st = extra[name](st)
        out[name] = st
    return list(out.values())
