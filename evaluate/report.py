"""Evaluation reports: JSON + Markdown table (paper table layout) + PNG figures, and side-by-side run tables.

``write_report(out_dir, results, ...)`` writes

* ``results.json`` -- everything in ``results`` (plus ``title``, ``config`` and ``fingerprints`` if passed);
* ``report.md`` -- a table in the layout of the paper's tables (method row(s) x metric columns, numbers in
  percent with one decimal: values in [0, 1] are multiplied by 100), then per-class IoU and the figure list;
* figures (matplotlib, Agg): ``per_class_iou.png`` (bars), ``confusion.png`` (row-normalised; values in the
  cells for small class counts, the largest confusions listed beside it for large ones),
  ``overlay_<i>.png`` (image | prediction | GT, both blended with the image, titled with the image id; overlays are
  ``(image, pred, gt[, image_id])``; legend of the classes present, the void pixels included), ``embeddings.png`` (2-D projection of segment embeddings,
  one panel per source, e.g. CLIP vs the model as in the paper's Fig. 4a: t-SNE when scikit-learn is
  installed and ``projection="tsne"``, else a shared PCA computed with numpy).

``results`` layout: any JSON-able dict. Table rows come from ``results["rows"]`` (list of dicts with a
``"Method"`` key and metric columns) when present; otherwise one row named ``results.get("method", title)``
with the scalar metrics found among :data:`TABLE_KEYS` (e.g. ``miou``, ``J&F-Mean``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from clips4.evaluate.metrics import ConfusionMatrix
from clips4.pipeline.safepath import output_path


__all__ = ["write_report", "side_by_side", "markdown_table", "project_2d", "TABLE_KEYS", "per_class_figure",
           "confusion_figure", "overlay_figure", "top_confusions"]

# metric key -> column title (order = column order)
TABLE_KEYS = {
    "miou": "mIoU",
    "miou_known": "mIoU_k",
    "miou_unknown": "mIoU_u",
    "hiou": "hIoU",
    "pixel_accuracy": "pAcc",
    "mean_accuracy": "mAcc",
    "knn_miou": "mIoU (k-NN)",
    "linear_miou": "mIoU (Linear)",
    "avgsim": "avgsim",
    "J-Mean": "J (Mean)",
    "F-Mean": "F (Mean)",
    "J&F-Mean": "J&F (Mean)",
}
_PERCENT_EXEMPT = {"avgsim"}


def _fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int, float, np.floating, np.integer)):
        v = float(v)
        if key not in _PERCENT_EXEMPT and abs(v) <= 1.0:
            v *= 100.0
        return f"{v:.1f}" if key not in _PERCENT_EXEMPT else f"{v:.2f}"
    return str(v)


def _flat_scalars(results: dict) -> dict:
    """Known metric keys found at top level or in ``results["global"]``."""
    out = {}
    for src in (results, results.get("global", {}) if isinstance(results.get("global"), dict) else {}):
        for k in TABLE_KEYS:
            if k in src and isinstance(src[k], (int, float)) or (k in src and src[k] is None):
                out.setdefault(k, src[k])
    return out


def _rows(results: dict, title: str) -> list[dict]:
    if isinstance(results.get("rows"), list) and results["rows"]:
        return [dict(r) for r in results["rows"]]
    row = {"Method": results.get("method", title)}
    row.update(_flat_scalars(results))
    return [row]


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """Rows (dicts with ``Method`` + metric keys) -> Markdown table with the paper's number format."""
    if columns is None:
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k != "Method" and k not in cols:
                    cols.append(k)
        known = [k for k in TABLE_KEYS if k in cols]
        columns = known + [k for k in cols if k not in TABLE_KEYS]
    head = ["Method"] + [TABLE_KEYS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([str(r.get("Method", ""))] + [_fmt(c, r.get(c)) for c in columns]) + " |")
    return "\n".join(lines)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, ConfusionMatrix):
        return {"num_classes": o.num_classes, "matrix": o.mat.tolist()}
    return str(o)


def _sanitize(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {str(k): _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    if isinstance(o, np.floating) and np.isnan(o):
        return None
    return o


def project_2d(X: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``(N, D)`` -> ``(N, 2)``: t-SNE (scikit-learn, if installed and asked for) or numpy PCA."""
    X = np.asarray(X, dtype=np.float64)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE

            perp = float(min(30, max(2, (len(X) - 1) / 3)))
            return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perp).fit_transform(X)
        except ImportError:
            pass
    Xc = X - X.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ vt[:2].T if vt.shape[0] >= 2 else np.pad(Xc @ vt[:1].T, ((0, 0), (0, 1)))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _wrapped(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches (a title wider than its figure is cut off)."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.62 * fontsize)))  # ~0.6 em per character in DejaVu Sans
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) or text


def _save(fig, path: Path, dpi: int = 100) -> None:
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)


def per_class_figure(names: list[str], ious: list, title: str):
    """Bar chart of per-class IoU (%) -> matplotlib Figure; the title is wrapped to stay inside the figure."""
    plt = _plt()
    vals = np.array([np.nan if v is None else v for v in ious], dtype=float) * 100
    width = max(6.0, 0.28 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.5), layout="constrained")
    ax.bar(range(len(names)), np.nan_to_num(vals), color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(_wrapped(title, width - 0.8, 12), fontsize=12)
    return fig


#: up to this many classes the confusion matrix is drawn with its values; above it the largest confusions
#: are listed beside it (a 171 x 171 grid of numbers is unreadable)
CONFUSION_VALUES_MAX = 25


def top_confusions(cm: ConfusionMatrix, names: Sequence[str], n: int = 20) -> list[dict]:
    """The ``n`` largest off-diagonal entries, as a share of their ground-truth class's pixels:
    ``[{"gt", "pred", "fraction", "pixels"}]``, largest fraction first (classes without pixels are skipped)."""
    m = cm.mat.astype(np.float64)
    rows = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(rows > 0, m / rows, 0.0)
    np.fill_diagonal(frac, 0.0)
    order = np.argsort(-frac, axis=None, kind="stable")[:n]
    out = []
    for flat in order:
        g, p = divmod(int(flat), m.shape[1])
        if frac[g, p] <= 0:
            break
        out.append({"gt": names[g], "pred": names[p], "fraction": float(frac[g, p]), "pixels": int(m[g, p])})
    return out


def confusion_figure(cm: ConfusionMatrix, names: list[str], top_n: int = 20):
    """Row-normalised confusion matrix -> matplotlib Figure. Up to :data:`CONFUSION_VALUES_MAX` classes each cell
    shows its percentage; for more, a second panel lists the ``top_n`` largest confusions (gt -> prediction)."""
    plt = _plt()
    m = cm.mat.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = m / m.sum(1, keepdims=True)
    m = np.nan_to_num(m)
    n = len(names)
    small = n <= CONFUSION_VALUES_MAX
    cell = 0.42 if small else 0.16
    side = max(4.5, cell * n + 2.5)
    if small:
        fig, ax = plt.subplots(figsize=(side + 1, side), layout="constrained")
    else:
        fig, (ax, ax_top) = plt.subplots(1, 2, figsize=(side + 7, side), layout="constrained",
                                         gridspec_kw={"width_ratios": [side, 6]})
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fs = 9 if small else 6
    ax.set_xticklabels(names, rotation=90, fontsize=fs)
    ax.set_yticklabels(names, fontsize=fs)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the ground-truth class's pixels")
    ax.set_title("confusion (row-normalised)")
    if small:
        for g in range(n):
            for p in range(n):
                if cm.mat[g].sum() == 0:
                    continue
                v = 100 * m[g, p]
                if g != p and v < 0.5:  # empty cells stay empty: the eye goes to the confusions
                    continue
                ax.text(p, g, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="black" if m[g, p] > 0.6 else "white")
    else:
        top = top_confusions(cm, names, top_n)
        labels = [f"{t['gt']} \u2192 {t['pred']}" for t in top][::-1]
        ax_top.barh(range(len(top)), [100 * t["fraction"] for t in top][::-1], color="tab:red")
        ax_top.set_yticks(range(len(top)))
        ax_top.set_yticklabels(labels, fontsize=9)
        ax_top.set_xlabel("% of the ground-truth class's pixels")
        ax_top.set_title(f"top {len(top)} confusions (ground truth \u2192 prediction)")
    return fig


def overlay_figure(image, pred, gt, names: Sequence[str] | None = None, ignore_index: int = 255,
                   alpha: float = 0.55, max_legend: int = 30, image_id: str | None = None):
    """image | prediction over the image | ground truth over the image, titled with ``image_id``, with a legend
    of the classes present in either (names and colours, largest first; the not-scored ground truth pixels, drawn
    in :data:`~clips4.evaluate.palette.VOID_COLOUR`, as "void") -> matplotlib Figure. Labels of another size are
    resized (nearest)."""
    from matplotlib.patches import Patch

    from clips4.evaluate.palette import VOID_COLOUR, figure_palette, legend_entries, overlay

    plt = _plt()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    H, W = image.shape[:2]

    def fit(lab):
        lab = np.asarray(lab).astype(np.int64)
        if lab.shape != (H, W):
            lab = lab[(np.arange(H) * lab.shape[0]) // H][:, (np.arange(W) * lab.shape[1]) // W]
        return lab

    pred, gt = fit(pred), fit(gt)
    pal = figure_palette()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), layout="constrained")
    panels = [("image", image), ("prediction", overlay(image, pred, pal, alpha=alpha, ignore_index=ignore_index)),
              ("ground truth", overlay(image, gt, pal, alpha=alpha, ignore_index=ignore_index, void=VOID_COLOUR))]
    for ax, (t, im) in zip(axes, panels):
        ax.imshow(im)
        ax.set_title(t)
        ax.axis("off")
    if image_id:
        fig.suptitle(str(image_id))
    entries = legend_entries([pred, gt], names, pal, ignore_index=ignore_index, limit=max_legend)
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="black", label=name) for _, name, c in entries]
    if np.any(gt == ignore_index):
        handles.append(Patch(facecolor=np.array(VOID_COLOUR) / 255, edgecolor="black", label="void (not scored)"))
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False,
                   ncol=1 + (len(handles) - 1) // 16)
    return fig


def _embedding_fig(path: Path, embeddings: dict, class_names: list[str] | None, projection: str) -> None:
    plt = _plt()
    n = len(embeddings)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.5), squeeze=False)
    # a shared PCA basis makes the panels comparable when the embeddings live in the same space (CLIP-aligned)
    dims = {np.asarray(X).shape[1] for X, _ in embeddings.values()}
    shared = None
    if projection == "pca" and len(dims) == 1:
        allx = np.concatenate([np.asarray(X, np.float64) for X, _ in embeddings.values()])
        mu = allx.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(allx - mu, full_matrices=False)
        shared = (mu, vt[:2])
    for ax, (name, (X, labels)) in zip(axes[0], embeddings.items()):
        X = np.asarray(X, np.float64)
        P = (X - shared[0]) @ shared[1].T if shared is not None else project_2d(X, projection)
        labels = np.asarray(labels)
        cmap = plt.get_cmap("tab20")
        for j, c in enumerate(np.unique(labels)):
            sel = labels == c
            lab = class_names[c] if class_names is not None and 0 <= int(c) < len(class_names) else str(c)
            ax.scatter(P[sel, 0], P[sel, 1], s=6, color=cmap(int(c) % 20), label=lab, alpha=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labs = axes[0][0].get_legend_handles_labels()
    if labs and len(labs) <= 30:
        fig.legend(handles, labs, loc="center right", fontsize=7, markerscale=2)
        fig.subplots_adjust(right=0.85)
    fig.suptitle(f"segment embeddings ({'shared PCA' if shared is not None else projection})")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    out_dir: str | Path,
    results: dict,
    *,
    title: str,
    class_names: Sequence[str] | None = None,
    confusion: ConfusionMatrix | None = None,
    overlays: Sequence[tuple] = (),
    embeddings: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    config: dict | None = None,
    fingerprints: dict | None = None,
    projection: str = "pca",
    max_overlays: int = 8,
) -> dict:
    """Write ``results.json``, ``report.md`` and figures into ``out_dir``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names is not None else None
    paths: dict[str, Path] = {}

    payload = {"title": title, **results}
    if config is not None:
        payload["config"] = config
    if fingerprints is not None:
        payload["fingerprints"] = fingerprints
    if confusion is not None and "confusion_matrix" not in payload:
        payload["confusion_matrix"] = confusion.mat.tolist()
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(_sanitize(payload), indent=2, default=_json_default))

    figures = []
    per_class = results.get("per_class_iou")
    if per_class is None and confusion is not None:
        ious = confusion.per_class_iou()
        per_class = {(names[i] if names else f"class_{i}"): (None if np.isnan(v) else float(v)) for i, v in enumerate(ious)}
    if per_class:
        paths["per_class_iou"] = out / "per_class_iou.png"
        _save(per_class_figure(list(per_class), list(per_class.values()), f"{title}: per-class IoU"),
              paths["per_class_iou"])
        figures.append(paths["per_class_iou"])
    if confusion is not None:
        cm_names = names if names and len(names) == confusion.num_classes else [str(i) for i in range(confusion.num_classes)]
        paths["confusion"] = out / "confusion.png"
        _save(confusion_figure(confusion, cm_names), paths["confusion"])
        figures.append(paths["confusion"])
    for i, (image, pred, gt, *image_id) in enumerate(list(overlays)[:max_overlays]):
        p = output_path(out, f"overlay_{i}.png", what="report figure")
        _save(overlay_figure(image, pred, gt, names, image_id=image_id[0] if image_id else None), p, dpi=90)
        paths[f"overlay_{i}"] = p
        figures.append(p)
    if embeddings:
        paths["embeddings"] = out / "embeddings.png"
        _embedding_fig(paths["embeddings"], embeddings, names, projection)
        figures.append(paths["embeddings"])

    md = [f"# {title}", "", markdown_table(_rows(results, title)), ""]
    if per_class:
        md += ["## Per-class IoU", "", "| Class | IoU |", "|---|---:|"]
        md += [f"| {k} | {_fmt('iou', v)} |" for k, v in per_class.items()]
        md.append("")
    if confusion is not None and confusion.num_classes > CONFUSION_VALUES_MAX:
        md += ["## Largest confusions", "", "| Ground truth | Prediction | % of its pixels |", "|---|---|---:|"]
        md += [f"| {t['gt']} | {t['pred']} | {100 * t['fraction']:.1f} |" for t in top_confusions(confusion, cm_names)]
        md.append("")
    if config:
        md += ["## Configuration", "", "```json", json.dumps(_sanitize(config), indent=2, default=_json_default), "```", ""]
    if figures:
        md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md))
    return paths


def _load_run(path: Path) -> dict:
    path = Path(path)
    for cand in ([path] if path.is_file() else [path / "results.json", path / "davis_results.json"]):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise FileNotFoundError(f"no results.json in {path}")


def side_by_side(run_dirs: Sequence[str | Path]) -> str:
    """Markdown table with one row per run (its ``rows`` or its scalar metrics), columns = union of metrics."""
    rows = []
    for d in run_dirs:
        res = _load_run(Path(d))
        name = Path(d).name if Path(d).is_dir() else Path(d).parent.name
        for r in _rows(res, res.get("title", name)):
            r = dict(r)
            method = str(r.get("Method", name))
            r["Method"] = method if method == name else f"{method} ({name})"
            proto = res.get("protocol") or ({21: "VOC-21", 20: "VOC-20"}.get(res.get("voc_mode")) if res.get("voc_mode") else None)
            if proto:  # VOC-20 and VOC-21 (or calibrated and not) are different numbers: every row says which
                r["Protocol"] = proto
            rows.append(r)
    return markdown_table(rows)
