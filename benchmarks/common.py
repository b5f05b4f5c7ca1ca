"""Helpers shared by the training benchmarks: build a synthetic world with its caches, evaluate a checkpoint.

The world is built by :func:`clips4.synthetic.build_world` (``SyntheticWorld.write``, the bundled
``synthetic.yaml`` pointed at the world's folder, the stages ``clips4 precompute`` runs); checkpoints are scored by
``clips4.evaluate.language.run_language``, as ``clips4 evaluate language`` scores them.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages.yaml"


def build_world(base: Path, n_train: int, n_val: int, *, seed: int = 0, quiet: bool = True, world: str | None = None,
                image_size: tuple[int, int] = (96, 128), variants: int = 0,
                variant_params: dict | None = None, teacher_params: dict | None = None,
                segments_params: dict | None = None) -> Path:
    """World + caches (train: segments, clip_features, prototypes; val: segments, clip_features) under ``base``
    (:func:`clips4.synthetic.build_world`); returns the path of the world's config (``configs_of`` adds its
    overlay). ``world``: a name of ``clips4.synthetic.WORLDS`` (None = the original world); ``teacher_params``:
    SyntheticTeacher kwargs over the world's own; ``segments_params``: segments-stage params over the config's."""
    from clips4.synthetic import build_world as build

    return build(base, n_train, n_val, world=world, seed=seed, image_size=image_size, variants=variants,
                 variant_params=variant_params, teacher=teacher_params,
                 params={"segments": segments_params} if segments_params else None, stages_file=STAGES,
                 show_progress=not quiet).configs[0]


def configs_of(cfg_path: Path) -> list[Path]:
    over = cfg_path.parent / "world.yaml"
    return [cfg_path, over] if over.exists() else [cfg_path]


def load(cfg_path: Path, *overrides: str):
    from clips4.pipeline.config import load_config

    return load_config(STAGES, configs_of(cfg_path), list(overrides))


def val_setup(cfg_path: Path):
    """(config, dataset) of the held-out val split."""
    from clips4.pipeline.stage import dataset_from_config

    cfg = load(cfg_path, "dataset.split=val")
    return cfg, dataset_from_config(cfg)


def language_miou(cfg_path: Path, model: str) -> float:
    """Language-driven mIoU on the val split: ``model`` = ``teacher`` or a checkpoint path."""
    from clips4.evaluate.language import run_language

    cfg, ds = val_setup(cfg_path)
    return float(run_language(cfg, ds, model=model, out=None)["miou"])


def _upsample_hwd(e: np.ndarray, hw: tuple[int, int]):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(e, dtype=np.float32)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0]
    return F.normalize(t, dim=0).flatten(1)  # (D, H*W)


def val_avgsim(cfg_path: Path, checkpoint: str | Path) -> float:
    """Mean over val superpixels (the cached UCM segments) of cos(model segment embedding, CLIP segment embedding).

    Both pixel maps are upsampled (bilinear) to the image, averaged inside each superpixel and normalised.
    """
    import torch

    from clips4.trainer.inference import model_embedder
    from clips4.pipeline.images import load_rgb
    from clips4.pipeline.stage import open_stage
    from clips4.trainer.loading import load_trained_model

    cfg, ds = val_setup(cfg_path)
    segs, feats = open_stage(cfg, "segments", ds), open_stage(cfg, "clip_features", ds)
    net, _ = load_trained_model(checkpoint, "cpu")
    embed = model_embedder(net, torch.device("cpu"))
    sims = []
    for rec in ds.records():
        labels = torch.from_numpy(segs.get(rec.image_id, "labels").astype(np.int64)).flatten()
        hw = tuple(segs.get(rec.image_id, "labels").shape)
        z = _upsample_hwd(embed(load_rgb(rec.path)), hw)
        c = _upsample_hwd(feats.get(rec.image_id, "features"), hw)
        valid = labels >= 0
        k = int(labels.max()) + 1
        onehot = torch.zeros(k, labels.numel())
        onehot[labels[valid], torch.nonzero(valid).squeeze(1)] = 1
        vz = torch.nn.functional.normalize(onehot @ z.t(), dim=1)
        vc = torch.nn.functional.normalize(onehot @ c.t(), dim=1)
        present = onehot.sum(1) > 0
        sims.append((vz * vc).sum(1)[present])
    return float(torch.cat(sims).mean())


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux /proc; 0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc)."""
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for c in (task / "children").read_text().split():
                out += [int(c), *child_pids(int(c))]
    except OSError:
        pass
    return out


class BackgroundSampler:
    """A sampling thread for ``with``: started on entry, asked to stop (``self._stop``) and joined on exit;
    subclasses write ``_run``."""

    def __init__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class RSSSampler(BackgroundSampler):
    """Samples the resident memory of this process (and, separately, its children) whenever the training run's
    ``metrics.jsonl`` reaches given line counts (= steps done). Runs in a thread; no hook into the loop needed."""

    def __init__(self, metrics_path: Path, at_steps: list[int], poll_s: float = 0.02):
        self.path, self.at, self.poll = metrics_path, sorted(at_steps), poll_s
        self.samples: dict[int, tuple[int, int]] = {}
        super().__init__()

    def _lines(self) -> int:
        try:
            with open(self.path, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        todo = list(self.at)
        while todo and not self._stop.is_set():
            n = self._lines()
            while todo and n >= todo[0]:
                kids = sum(rss_bytes(c) for c in child_pids(os.getpid()))
                self.samples[todo.pop(0)] = (rss_bytes(os.getpid()), kids)
            time.sleep(self.poll)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
