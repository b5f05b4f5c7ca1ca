"""Class-free semantic segmentation: the paper's known/unknown protocol (section 4.3, Table 3).

The classes are split into folds. For each fold, its classes are *unknown*: they are left out of the known
prototypes (a class file of the known classes is written and the prototypes stage runs with it), the model is
trained with several seeds (``prototypes.seed`` = ``train.seed`` = the seed: the unknown prototypes are
initialised differently each run), and evaluated on *all* classes with language-driven segmentation. Reported
per fold: mIoU over the unknown classes (mIoU_u), over the known classes (mIoU_k) and their harmonic mean
(hIoU = 2 u k / (u + k)), as mean ± std over seeds (population std, ddof=0). The IoUs come from one confusion
matrix over all classes, so a pixel of an unknown class predicted as a known class counts against both.

Folds: for Pascal-Context's 59 classes in 4 folds the fixed split shipped in ``clips4/data/folds/
context59_folds.json`` is used (made by :func:`make_folds` with seed 0 over ``class_names("context59")``:
a seeded permutation cut into 4 contiguous parts of 15/15/15/14, each fold listed in the class-list order).
Any other class set (e.g. the synthetic world's) is split by :func:`make_folds` on the fly with ``--fold-seed``.

The teacher (cached CLIP dense features, MaskCLIP) is evaluated once on the same split as a baseline row: it is
not trained, so it does not depend on the fold except through which classes are averaged.
"""
from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clips4.pipeline.config import Config

FOLDS_FILE = "context59_folds.json"


def make_folds(names: Sequence[str], n_folds: int, seed: int = 0) -> list[list[str]]:
    """Split ``names`` into ``n_folds`` folds of (nearly) equal size: ``np.random.default_rng(seed).permutation``
    of the indices, cut with ``np.array_split`` (the first folds get the extra class), each fold in list order."""
    names = list(names)
    if not 2 <= n_folds <= len(names):
        raise ValueError(f"need 2 <= folds <= number of classes ({len(names)}), got {n_folds}")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")
    perm = np.random.default_rng(seed).permutation(len(names))
    return [[names[i] for i in sorted(part.tolist())] for part in np.array_split(perm, n_folds)]


def bundled_folds() -> dict:
    """The stored Pascal-Context 59 folds (``{"classes": ..., "n_folds": 4, "seed": 0, "folds": [[...], ...]}``)."""
    return json.loads(resources.files("clips4.data").joinpath("folds", FOLDS_FILE).read_text())


def folds_for(names: Sequence[str], n_folds: int, seed: int = 0) -> tuple[list[list[str]], str]:
    """(folds, where they come from): the stored Context-59 split when it applies, else :func:`make_folds`."""
    try:
        stored = bundled_folds()
    except FileNotFoundError:
        stored = None
    if stored and n_folds == stored["n_folds"] and seed == stored["seed"] and set(names) == set(stored["classes"]) \
            and len(names) == len(stored["classes"]):
        return [list(f) for f in stored["folds"]], f"clips4/data/folds/{FOLDS_FILE}"
    return make_folds(names, n_folds, seed), f"make_folds(seed={seed})"


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std())


def _scores(cm, names: list[str], unknown: Sequence[str]) -> dict:
    from clips4.evaluate.metrics import harmonic_mean

    unk = [names.index(c) for c in unknown]
    known = [i for i in range(len(names)) if i not in unk]
    u, k = cm.miou_over(unk), cm.miou_over(known)
    h = harmonic_mean(u, k)
    f = lambda x: None if x is None or math.isnan(x) else float(x)  # noqa: E731
    return {"miou_unknown": f(u), "miou_known": f(k), "hiou": f(h), "miou": f(cm.miou()),
            "pixel_accuracy": f(cm.pixel_accuracy())}


def _known_class_file(out: Path, fold: int, known: list[str]) -> Path:
    """The known classes of a fold as a text file named by its content (the prototypes fingerprint sees the path)."""
    text = "\n".join(known) + "\n"
    p = out / "classes" / f"fold{fold}-known-{hashlib.sha256(text.encode()).hexdigest()[:10]}.txt"
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists() or p.read_text() != text:
        p.write_text(text)
    return p.resolve()


def _fmt(mean, std) -> str:
    return "-" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def run_class_free(
    cfg: Config,
    *,
    n_folds: int = 4,
    fold_seed: int = 0,
    only_folds: Sequence[int] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    iterations: int | None = None,
    checkpoints: Sequence[str | Path] = (),
    eval_split: str | None = "val",
    classes: str | None = None,
    baseline: bool = True,
    precompute_stages: bool = True,
    device: str = "auto",
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the known/unknown protocol; see the module docstring. ``cfg``'s dataset split is the training split.

    With ``checkpoints``, nothing is trained: each checkpoint's known classes (stored in it) decide its fold
    (unknown = all classes it was not given); its ``train.seed`` is its seed."""
    from clips4.evaluate.report import write_report
    from clips4.evaluate.language import language_confusion
    from clips4.evaluate.sources import (checkpoint_source, config_summary, embedding_source, precompute,
                                         resolve_classes, text_embeddings_for, with_params, with_split)
    from clips4.pipeline.stage import dataset_from_config

    say = progress or (lambda m: None)
    train_ds = dataset_from_config(cfg)
    eval_cfg = with_split(cfg, eval_split)
    eval_ds = dataset_from_config(eval_cfg)
    names = resolve_classes(classes, eval_ds)
    folds, fold_source = folds_for(names, n_folds, fold_seed)
    selected = sorted(set(only_folds)) if only_folds else list(range(len(folds)))
    for f in selected:
        if not 0 <= f < len(folds):
            raise ValueError(f"--fold {f}: there are {len(folds)} folds (0..{len(folds) - 1})")
    text, backend_info = text_embeddings_for(cfg, names)
    out = Path(out) if out is not None else None
    runs: list[dict] = []

    def evaluate(src, label: str) -> object:
        say(f"evaluating {label} on {eval_ds.key} ({len(names)} classes)")
        _, cm, _ = language_confusion(src, eval_ds, names, text)
        return cm

    if checkpoints:
        for ck in checkpoints:
            src = checkpoint_source(ck, device)
            known = set(src.info.get("known_classes") or [])
            extra = sorted(known - set(names))
            if extra:
                raise ValueError(f"{ck} was trained with classes {extra} that the evaluation classes do not have")
            unknown = [c for c in names if c not in known]
            fold = next((i for i, fc in enumerate(folds) if set(fc) == set(unknown)), None)
            seed = src.info.get("train_seed")
            cm = evaluate(src, f"{ck} (unknown: {', '.join(unknown) or 'none'})")
            runs.append({"fold": fold, "unknown": unknown, "seed": seed, "checkpoint": str(ck),
                         **_scores(cm, names, unknown)})
    else:
        from clips4.pipeline.stage import run_stage
        from clips4.trainer.train import train

        if out is None:
            raise ValueError("class-free training needs an output folder (--out)")
        if precompute_stages:
            say(f"precomputing segments + clip_features for {train_ds.key}")
            precompute(cfg, ["segments", "clip_features"])
        for f in selected:
            unknown = folds[f]
            known = [c for c in names if c not in unknown]
            class_file = _known_class_file(out, f, known)
            for s in seeds:
                upd_train = {"seed": int(s), "name": f"fold{f}-seed{s}"}  # published under <out>/runs
                if iterations is not None:
                    upd_train["iterations"] = int(iterations)
                c = with_params(cfg, prototypes={"classes": str(class_file), "seed": int(s)}, train=upd_train)
                c.runs_root = str(Path(out) / "runs")  # not the project's runs/: these are the evaluation's own
                say(f"fold {f} seed {s}: {len(known)} known, unknown = {', '.join(unknown)}")
                run_stage(c, "prototypes", dataset=train_ds, show_progress=False)
                res = train(c, dataset=train_ds, resume=True, show_progress=False)
                ck = Path(res.out) / "final.pt"
                if not ck.is_file():
                    raise RuntimeError(f"training fold {f} seed {s} stopped without {ck} ({res.stopped})")
                cm = evaluate(checkpoint_source(ck, device), f"fold {f} seed {s}")
                runs.append({"fold": f, "unknown": unknown, "seed": int(s), "checkpoint": str(ck),
                             **_scores(cm, names, unknown)})

    teacher = None
    if baseline:
        try:
            if precompute_stages:
                precompute(eval_cfg, ["clip_features"])
            cm = evaluate(embedding_source(eval_cfg, eval_ds, "teacher", device), "teacher")
            teacher = {"miou": None if math.isnan(cm.miou()) else float(cm.miou()),
                       "folds": {i: _scores(cm, names, folds[i]) for i in range(len(folds))}}
        except Exception as exc:  # noqa: BLE001 - the baseline is extra; its failure must not hide the results
            say(f"[yellow]teacher baseline skipped:[/] {exc}")
            teacher = None

    summary = []
    fold_keys = sorted({r["fold"] for r in runs if r["fold"] is not None}) + \
        (["custom"] if any(r["fold"] is None for r in runs) else [])
    for fk in fold_keys:
        rs = [r for r in runs if (r["fold"] if r["fold"] is not None else "custom") == fk]
        row = {"fold": fk, "unknown": rs[0]["unknown"] if fk != "custom" else None, "n_seeds": len(rs),
               "seeds": [r["seed"] for r in rs]}
        for key in ("miou_unknown", "miou_known", "hiou", "miou"):
            m, sd = _mean_std([r[key] for r in rs])
            row[key], row[f"{key}_std"] = m, sd
        summary.append(row)
    overall = {}
    for key in ("miou_unknown", "miou_known", "hiou"):
        overall[key], overall[f"{key}_std_over_folds"] = _mean_std([r[key] for r in summary if r["fold"] != "custom"])

    # Table 3 layout: one row per method, fold{i} mIoU_u / mIoU_k / hIoU columns
    ours = {"Method": f"CLIP-S4 (mean ± std over {max((r['n_seeds'] for r in summary), default=0)} seeds)"}
    for r in summary:
        for key, col in (("miou_unknown", "mIoU_u"), ("miou_known", "mIoU_k"), ("hiou", "hIoU")):
            ours[f"fold{r['fold']} {col}"] = _fmt(r[key], r[f"{key}_std"])
    rows = [ours]
    if teacher:
        t = {"Method": "teacher (CLIP dense features)"}
        for r in summary:
            if r["fold"] == "custom":
                continue
            sc = teacher["folds"][r["fold"]]
            for key, col in (("miou_unknown", "mIoU_u"), ("miou_known", "mIoU_k"), ("hiou", "hIoU")):
                t[f"fold{r['fold']} {col}"] = "-" if sc[key] is None else f"{100 * sc[key]:.1f}"
        rows.append(t)
    results = {
        "task": "class-free", "dataset": eval_ds.describe(), "train_dataset": train_ds.describe(), "classes": names,
        "folds": {"source": fold_source, "n_folds": len(folds), "seed": fold_seed, "unknown": folds},
        "runs": runs, "summary": summary, **overall, "teacher": teacher, "rows": rows,
        "text_backend": backend_info, "iterations": iterations,
    }
    if out is not None:
        write_report(out, results, title=f"class-free segmentation (known/unknown folds) on {eval_ds.key}",
                     config=config_summary(cfg), fingerprints={"checkpoints": [r["checkpoint"] for r in runs]})
    return results


def print_results(console, res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"class-free segmentation: {res['folds']['n_folds']} folds ({res['folds']['source']}), "
                    f"{len(res['classes'])} classes, mean ± std over seeds (%)")
    for col in ("fold", "unknown classes", "seeds", "mIoU_u", "mIoU_k", "hIoU", "teacher mIoU_u / mIoU_k / hIoU"):
        t.add_column(col, justify="left" if col in ("fold", "unknown classes") else "right")
    teacher = res.get("teacher") or {}
    for r in res["summary"]:
        unk = r["unknown"] or []
        tsc = teacher.get("folds", {}).get(r["fold"]) if r["fold"] != "custom" else None
        tcol = "-" if not tsc else " / ".join("-" if tsc[k] is None else f"{100 * tsc[k]:.1f}"
                                              for k in ("miou_unknown", "miou_known", "hiou"))
        t.add_row(str(r["fold"]), ", ".join(unk[:6]) + (f" (+{len(unk) - 6})" if len(unk) > 6 else ""),
                  ",".join(map(str, r["seeds"])), _fmt(r["miou_unknown"], r["miou_unknown_std"]),
                  _fmt(r["miou_known"], r["miou_known_std"]), _fmt(r["hiou"], r["hiou_std"]), tcol)
    console.print(t)
    if res.get("miou_unknown") is not None:
        console.print(f"mean over folds: mIoU_u = {100 * res['miou_unknown']:.1f}, mIoU_k = "
                      f"{100 * res['miou_known']:.1f}, hIoU = {100 * res['hiou']:.1f}" if res.get("hiou") is not None
                      else f"mean over folds: mIoU_u = {100 * res['miou_unknown']:.1f}")
