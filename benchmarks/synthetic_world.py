"""Benchmark: does ``clips4 train`` learn? Teacher vs student on a synthetic world, and the loss ablation.

Builds a synthetic world (default 64 train / 16 val images), runs the pipeline stages (segments, clip-features
with the synthetic CLIP-like teacher, prototypes; val caches too), trains the full model with the bundled
``data/configs/synthetic.yaml`` and prints the language-driven mIoU of the teacher (its cached dense features)
and of the student (the trained network) on the held-out val images. Target: student >= teacher + 10 points.

Then the ablation table (paper Table 6): L_t only, L_t+L_e, L_t+L_s, L_e+L_s, all three — each trained the same
way — with val mIoU and val avgsim (mean over the cached val superpixels of cos(student segment embedding, CLIP
segment embedding)). L_t alone has no link to CLIP's space: its language mIoU is expected to be poor.

    .venv/bin/python benchmarks/synthetic_world.py [--iterations N] [--n-train N] [--n-val N] [--quick]
        [--no-ablation] [--ablation-iterations N] [--work DIR] [--set train.KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_world, language_miou, load, log, read_metrics, val_avgsim  # noqa: E402

ABLATION = [  # (name, w_t, w_e, w_s)
    ("L_t", 1, 0, 0),
    ("L_t + L_e", 1, 1, 0),
    ("L_t + L_s", 1, 0, 1),
    ("L_e + L_s", 0, 1, 1),
    ("L_t + L_e + L_s", 1, 1, 1),
]


def train_run(cfg_path: Path, out: Path, overrides: list[str]) -> tuple[Path, float, dict]:
    from clips4.trainer.train import train

    t0 = time.perf_counter()
    cfg = load(cfg_path, *overrides, f"train.out={json.dumps(str(out))}")
    train(cfg, restart=not (out / "final.pt").exists(), show_progress=False)
    rows = read_metrics(out)
    tail = rows[-max(1, len(rows) // 10):]
    last = {k: sum(r[k] for r in tail) / len(tail) for k in ("L_t", "L_e", "L_s", "avgsim")}
    return out / "final.pt", time.perf_counter() - t0, last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=None, help="training iterations (default: the bundled config's)")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="16 train / 8 val images, 60 iterations, batch 4")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--ablation-iterations", type=int, default=None, help="default: --iterations")
    ap.add_argument("--work", type=Path, default=None, help="work folder (kept; default: a temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override, e.g. train.lr=0.1")
    a = ap.parse_args(argv)
    extra = list(a.sets)
    if a.quick:
        a.n_train, a.n_val = min(a.n_train, 16), min(a.n_val, 8)
        a.iterations = a.iterations or 60
        extra = ["train.batch_size=4", *extra]
    if a.iterations:
        extra.append(f"train.iterations={a.iterations}")
    work = a.work or Path(tempfile.mkdtemp(prefix="clips4-synthetic-"))
    log(f"work folder: {work}")

    t0 = time.perf_counter()
    cfg_path = build_world(work, a.n_train, a.n_val)
    log(f"world + caches: {time.perf_counter() - t0:.1f} s")
    p = load(cfg_path, *extra).params("train")
    print(f"synthetic world: {a.n_train} train / {a.n_val} val images; training: {p.iterations} iterations, batch "
          f"{p.batch_size}, crop {p.crop_size}, lr {p.lr}, n_segments {p.n_segments}, backbone {p.backbone}")

    teacher = language_miou(cfg_path, "teacher")
    ckpt, secs, last = train_run(cfg_path, work / "runs" / "full", extra)
    student = language_miou(cfg_path, str(ckpt))
    gain = 100 * (student - teacher)
    print(f"\nlanguage-driven mIoU on {a.n_val} held-out val images")
    print(f"  teacher (cached CLIP-like dense features): {100 * teacher:5.1f}")
    print(f"  student (trained network, {secs:.0f} s):     {100 * student:5.1f}   ({gain:+.1f} points)")
    print(f"  target student >= teacher + 10 points: {'MET' if gain >= 10 else 'NOT MET'}")
    sys.stdout.flush()

    if a.no_ablation:
        return 0 if gain >= 10 else 1
    abl_extra = [e for e in extra if not e.startswith("train.iterations=")]
    abl_extra.append(f"train.iterations={a.ablation_iterations or p.iterations}")
    rows = []
    for name, wt, we, ws in ABLATION:
        ov = [*abl_extra, f"train.w_t={wt}", f"train.w_e={we}", f"train.w_s={ws}"]
        tag = name.replace(" + ", "+").replace(" ", "")
        if (wt, we, ws) == (1, 1, 1) and (a.ablation_iterations or p.iterations) == p.iterations:
            out, secs, last_ = ckpt, secs, last  # the full run above is this row
        else:
            out, secs, last_ = train_run(cfg_path, work / "runs" / tag, ov)
        rows.append((name, wt, we, ws, language_miou(cfg_path, str(out)), val_avgsim(cfg_path, out), last_["avgsim"], secs))
        log(f"ablation {name}: done")
    print(f"\nablation (paper Table 6), {a.ablation_iterations or p.iterations} iterations each; val = {a.n_val} held-out images")
    print(f"{'losses':<18}{'L_t':>4}{'L_e':>4}{'L_s':>4}{'mIoU':>8}{'avgsim':>8}{'train avgsim':>14}{'time s':>8}")
    print(f"{'teacher (CLIP)':<18}{'':>12}{100 * teacher:>8.1f}{1.0:>8.3f}{'':>14}{'':>8}")
    for name, wt, we, ws, m, s, ts, secs in rows:
        mark = lambda w: "x" if w else "-"  # noqa: E731
        print(f"{name:<18}{mark(wt):>4}{mark(we):>4}{mark(ws):>4}{100 * m:>8.1f}{s:>8.3f}{ts:>14.3f}{secs:>8.0f}")
    return 0 if gain >= 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
