"""Which cue a model reads on a synthetic world's val images: its class (texture) or the colours it wears.

In a spurious-colour world (``clips4.synthetic``, ``spurious_colour``) every val region wears the colours
(hue, luminance, or both) of a random class, so a model that learned colour instead of texture predicts the worn
class. Per model (``teacher`` or a checkpoint) on the cached val images:

- ``follows_class`` / ``follows_cue``: on the pixels whose worn class differs from their class, the share the model
  labels with their class / with the worn class (plain arg-max over the class texts);
- ``probe_class`` / ``probe_cue``: held-out accuracy of a linear probe on the model's embeddings (a softmax
  regression fitted on the even images' pixels, scored on the odd ones) that predicts each pixel's class / worn
  class. A model that ignores colour gives ``probe_cue`` near chance (1 / classes); one that reads colour, high;
- ``probe_luminance``: the same for the worn class's luminance tercile (dark / middle / light), a luminance-only cue;
- ``confusion``: the class whose pixels go most to one other class, and that share (every world; in a context world
  the pair a class was always seen beside).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _probe(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n: int,
           steps: int = 150) -> float:
    """Held-out accuracy of a softmax regression ``x -> y`` (standardised inputs, full-batch Adam)."""
    import torch

    if len(x_fit) == 0 or len(x_test) == 0:
        return float("nan")
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    xf = torch.from_numpy((x_fit - mu) / sd).float()
    xt = torch.from_numpy((x_test - mu) / sd).float()
    yf = torch.from_numpy(y_fit).long()
    lin = torch.nn.Linear(xf.shape[1], n)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xf), yf).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(xt).argmax(1).numpy() == y_test).mean())


def cue_report(cfg_path: Path, model: str, world: str, seed: int, image_size=(64, 96), max_pixels: int = 8000) -> dict:
    """The module docstring's figures for ``model`` on the val split of the world built by ``common.build_world``
    from ``world`` / ``seed`` / ``image_size`` (its val images are regenerated to know the colours they wear)."""
    from clips4.evaluate.language import predict_labels
    from clips4.evaluate.sources import embedding_source, resolve_classes, source_text_embeddings
    from clips4.evaluate.sources import text_embeddings_for
    from clips4.synthetic import world_from_preset

    from common import val_setup

    cfg, ds = val_setup(cfg_path)
    w, _ = world_from_preset(world, image_size, seed)
    src = embedding_source(cfg, ds, model, "cpu")
    names = resolve_classes(None, ds)
    text, _ = text_embeddings_for(cfg, names) if model == "teacher" else source_text_embeddings(cfg, src, names)
    luma = np.array([0.299, 0.587, 0.114])
    lum_of = np.array([(np.array(s.fg) + np.array(s.bg)) @ luma for s in w.specs])
    lum_bin = np.searchsorted(np.quantile(lum_of, [1 / 3, 2 / 3]), lum_of, side="right")  # class -> tercile
    n = w.n_classes
    rng = np.random.default_rng(0)
    conf = np.zeros((n, n), np.int64)
    differ = hit_cls = hit_cue = 0
    rows = {0: [], 1: []}
    for k, rec in enumerate(sorted(ds.records(), key=lambda r: r.image_id)):
        _, mask, worn = w.sample_with_cues(int(rec.image_id), "val")
        emb = np.asarray(src.embed(rec), np.float32)  # (h, w, D)
        pred = predict_labels(emb, text, mask.shape, layout="hwd")
        conf += np.bincount(mask.ravel() * n + pred.ravel(), minlength=n * n).reshape(n, n)
        d = worn != mask
        differ += int(d.sum())
        hit_cls += int((pred[d] == mask[d]).sum())
        hit_cue += int((pred[d] == worn[d]).sum())
        h, wd = emb.shape[:2]
        ys = ((np.arange(h) + 0.5) * mask.shape[0] / h).astype(int)
        xs = ((np.arange(wd) + 0.5) * mask.shape[1] / wd).astype(int)
        rows[k % 2].append((emb.reshape(-1, emb.shape[-1]), mask[ys][:, xs].ravel(), worn[ys][:, xs].ravel()))

    def stack(part):
        if not rows[part]:
            return np.zeros((0, 1)), np.zeros(0, int), np.zeros(0, int)
        x, y, c = (np.concatenate(v) for v in zip(*rows[part]))
        keep = rng.permutation(len(x))[:max_pixels]
        return x[keep], y[keep], c[keep]

    (xf, yf, cf), (xt, yt, ct) = stack(0), stack(1)
    off = conf.astype(float) / np.maximum(conf.sum(1, keepdims=True), 1)
    np.fill_diagonal(off, 0)
    a, b = np.unravel_index(off.argmax(), off.shape)
    return {
        "follows_class": hit_cls / differ if differ else float("nan"),
        "follows_cue": hit_cue / differ if differ else float("nan"),
        "probe_class": _probe(xf, yf, xt, yt, n),
        "probe_cue": _probe(xf, cf, xt, ct, n),
        "probe_luminance": _probe(xf, lum_bin[cf], xt, lum_bin[ct], 3),
        "confusion": (names[a], names[b], float(off[a, b])),
    }


def cue_line(r: dict) -> str:
    """One line of :func:`cue_report`'s figures."""
    a, b, s = r["confusion"]
    pct = lambda v: "  -  " if v != v else f"{100 * v:5.1f}"  # noqa: E731
    top = f"top confusion {a[:10]} -> {b[:10]} {100 * s:.0f} %"
    if r["follows_class"] != r["follows_class"]:  # colours not shuffled in val: only the class probe means anything
        return f"probe class {pct(r['probe_class'])}; {top}"
    return (f"follows class {pct(r['follows_class'])} / worn colours {pct(r['follows_cue'])}; probe class "
            f"{pct(r['probe_class'])}, worn colours {pct(r['probe_cue'])}, luminance {pct(r['probe_luminance'])}; "
            f"{top}")
