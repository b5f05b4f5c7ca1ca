"""A compact learned edge detector trained from scratch on a BSDS-layout folder, and its ONNX export.

Model (:class:`EdgeNet`, ~0.1 M parameters): a HED/PiDiNet-Tiny style network.  Four stages at strides
1, 2, 4, 8 of plain 3x3 convolutions (dilated inside the stages for context; plain convolutions train
~3x faster on CPU than depthwise-separable ones of the same cost); every
stage has a 1x1 side output, upsampled bilinearly to the input size, and a 1x1 fusion of the four side maps
gives the fused output.  Input: ``(N, 3, H, W)`` float32 CIE-Lab (L/100, a/128, b/128, see
:func:`lab_input`); outputs: ``(N, 5, H, W)`` logits, channels 0..3 side outputs, 4 the fused map.

Training recipe (Xie & Tu 2015, Liu et al. 2017 (RCF), Su et al. 2021 (PiDiNet)):

* labels: the mean of the annotators' boundary maps; pixels with mean >= ``eta`` are edges, pixels with
  0 < mean < ``eta`` (a minority of annotators) are ignored, the rest are non-edges;
* loss: class-balanced BCE (positives weighted by the non-edge fraction, non-edges by ``lambda_`` times
  the edge fraction, per image) summed over the side outputs and the fused output;
* augmentation: random crops of size ``crop``, rotations (any angle, reflected borders), scales, flips;
* seeded and resumable: the sample drawn at iteration ``i`` depends only on ``(seed, i)``; checkpoints are
  written atomically and loaded with ``weights_only=True``.

Label preparation (decoding the ``.mat`` files) is cached under the output folder as one ``.npz`` per
split, keyed by the split's file list and sizes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from clips4.pipeline.contours import lab_input  # the one input transform of training and inference

__all__ = [
    "EdgeTrainParams",
    "lab_input",
    "load_bsds_split",
    "build_edge_net",
    "train_edges",
    "export_onnx",
    "EdgeTrainError",
]


class EdgeTrainError(RuntimeError):
    """Bad training input (missing folder, no images); the message names the item."""


@dataclass
class EdgeTrainParams:
    root: str = ""  # a BSDS500-layout folder (images/<split>, groundTruth/<split>); required
    splits: tuple[str, ...] = ("train",)
    out: str = "runs/contours"
    iterations: int = 3000
    batch: int = 8
    crop: int = 160
    lr: float = 3e-3
    weight_decay: float = 1e-4
    eta: float = 0.3  # consensus: fraction of annotators marking a pixel for it to be an edge
    lambda_: float = 1.1  # non-edge weight factor of the balanced BCE
    scales: tuple[float, float] = (0.7, 1.3)
    width: int = 8  # channels of the first stage (x2, x4, x6 at strides 2, 4, 8)
    seed: int = 0
    threads: int = 1
    workers: int = 0  # data-loader processes drawing the crops (0: in the training process); same samples for any
    device: str = "auto"
    checkpoint_every: int = 100
    snapshot_every: int = 0  # keep edges-<iteration>.pt every N iterations (training curve); 0 = none
    log_every: int = 20
    val_every: int = 0  # 0: no in-training validation; else every N iterations on val_images images
    val_split: str = "val"
    val_images: int = 10
    time_limit_s: float = 0.0  # stop (after a checkpoint) once this much wall time has passed; 0 = none
    limit_images: int = 0  # use only the first N images of each split (tests); 0 = all
    #: weights to start from instead of a random initialisation (an ``edges.pt`` or ``edges-<iteration>.pt`` of
    #: the same width; fine-tuning with its own schedule); None = from scratch. A resumed run ignores it
    init: str | None = None

    def signature(self) -> dict:
        return {"model": "clips4-edgenet-v1", "width": self.width}


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def _consensus(bmaps: list[np.ndarray]) -> np.ndarray:
    """Mean of the annotators' binary boundary maps as uint8 0..255."""
    acc = np.zeros(bmaps[0].shape, dtype=np.float32)
    for b in bmaps:
        acc += (np.asarray(b) > 0).astype(np.float32)
    return np.rint(acc * (255.0 / len(bmaps))).astype(np.uint8)


def _list_split(root: Path, split: str) -> list[tuple[str, Path, Path]]:
    img_dir = root / "images" / split
    gt_dir = root / "groundTruth" / split
    if not img_dir.is_dir():
        raise EdgeTrainError(f"train contours: image folder not found: {img_dir}")
    if not gt_dir.is_dir():
        raise EdgeTrainError(f"train contours: ground-truth folder not found: {gt_dir}")
    items = []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        g = gt_dir / f"{p.stem}.mat"
        if g.is_file():
            items.append((p.stem, p, g))
    if not items:
        raise EdgeTrainError(f"train contours: no image with a .mat ground truth in {img_dir}")
    return items


def load_bsds_split(root: str | Path, split: str, cache_dir: str | Path | None = None, limit: int = 0):
    """Images and consensus labels of one split: (ids, list of (H, W, 3) uint8 RGB, list of (H, W) uint8).

    The decoded labels are cached in ``cache_dir/labels-<split>-<key>.npz``; the key hashes the ids,
    file sizes and modification times, so a changed folder re-prepares them.
    """
    from clips4.pipeline.datasets import load_bsds_ground_truth

    items = _list_split(Path(root), split)
    if limit:
        items = items[:limit]
    h = hashlib.sha256()
    for sid, p, g in items:
        for f in (p, g):
            st = f.stat()
            h.update(f"{sid}:{f.name}:{st.st_size}:{int(st.st_mtime)};".encode())
    key = h.hexdigest()[:16]
    images = []
    for sid, p, _ in items:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise EdgeTrainError(f"train contours: cannot read image {p}")
        images.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    cache = Path(cache_dir) / f"labels-{split}-{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            labels = [z[sid] for sid, _, _ in items]
    else:
        labels = []
        for sid, _, g in items:
            try:
                bmaps, _ = load_bsds_ground_truth(g)
            except Exception as exc:  # noqa: BLE001 - scipy's errors name nothing
                raise EdgeTrainError(f"train contours: cannot read ground truth {g}: {exc}") from None
            labels.append(_consensus(bmaps))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp.npz")
            np.savez_compressed(tmp, **{sid: lab for (sid, _, _), lab in zip(items, labels)})
            os.replace(tmp, cache)
    for (sid, _, _), im, lab in zip(items, images, labels):
        if im.shape[:2] != lab.shape:
            raise EdgeTrainError(f"train contours: image {sid} is {im.shape[:2]} but its ground truth {lab.shape}")
    return [sid for sid, _, _ in items], images, labels


def sample_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, crop: int,
                scales: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (crop, crop) sample: rotation by any angle, scale, flip, reflected borders.

    One affine warp maps the output crop into the source image, so the cost is that of the crop.
    Returns the (crop, crop, 3) uint8 image and the (crop, crop) float32 consensus in [0, 1].
    """
    H, W = label.shape
    angle = rng.uniform(0.0, 2.0 * math.pi) if rng.random() < 0.5 else rng.integers(0, 4) * (math.pi / 2)
    s = math.exp(rng.uniform(math.log(scales[0]), math.log(scales[1])))
    flip = rng.random() < 0.5
    cx, cy = rng.uniform(0, W - 1), rng.uniform(0, H - 1)
    c, si = math.cos(angle) / s, math.sin(angle) / s
    fx = -1.0 if flip else 1.0
    # output (u, v) centred -> source: R(angle)/s @ diag(fx, 1) @ (u - crop/2, v - crop/2) + (cx, cy)
    h = crop / 2.0
    M = np.array([[c * fx, -si, 0.0], [si * fx, c, 0.0]], dtype=np.float64)
    M[0, 2] = cx - (M[0, 0] * h + M[0, 1] * h)
    M[1, 2] = cy - (M[1, 0] * h + M[1, 1] * h)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    img = cv2.warpAffine(image, M, (crop, crop), flags=flags, borderMode=cv2.BORDER_REFLECT_101)
    lab = cv2.warpAffine(label.astype(np.float32) * np.float32(1 / 255.0), M, (crop, crop), flags=flags,
                         borderMode=cv2.BORDER_REFLECT_101)
    if s < 1.0:
        # downscaling spreads a 1-px boundary over less than a pixel: bilinear sampling would thin its
        # value, so take the max over the source footprint instead (a dilated label sampled bilinearly)
        k = int(math.ceil(1.0 / s))
        dil = cv2.dilate(label, np.ones((k, k), np.uint8)).astype(np.float32) * np.float32(1 / 255.0)
        lab = np.maximum(lab, cv2.warpAffine(dil, M, (crop, crop), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                             borderMode=cv2.BORDER_REFLECT_101))
    if rng.random() < 0.5:  # photometric jitter: brightness / contrast
        a = rng.uniform(0.8, 1.2)
        b = rng.uniform(-20, 20)
        img = np.clip(img.astype(np.float32) * a + b, 0, 255).astype(np.uint8)
    return img, lab


class CropBatches:
    """Map-style dataset of whole batches: item ``i`` is iteration ``i``'s ``(x, y)`` — ``(B, 3, crop, crop)``
    float32 Lab input and ``(B, 1, crop, crop)`` float32 consensus — drawn with ``default_rng([seed, i])``, so the
    batches are the same whichever process (and however many loader workers) draws them."""

    def __init__(self, images: list[np.ndarray], labels: list[np.ndarray], p: "EdgeTrainParams") -> None:
        self.images, self.labels = images, labels
        self.seed, self.batch, self.crop, self.scales = p.seed, p.batch, p.crop, tuple(p.scales)

    def __getitem__(self, it: int):
        import torch

        rng = np.random.default_rng([self.seed, int(it)])
        xs, ys = [], []
        for _ in range(self.batch):
            k = int(rng.integers(len(self.images)))
            img, lab = sample_crop(self.images[k], self.labels[k], rng, self.crop, self.scales)
            xs.append(lab_input(img))
            ys.append(lab[None])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def batches(data: CropBatches, start: int, stop: int, workers: int):
    """Iterations ``start..stop-1``'s batches, in order (loader processes when ``workers`` > 0)."""
    if workers <= 0:
        return (data[i] for i in range(start, stop))
    from torch.utils.data import DataLoader

    # OpenCV's thread pool does not survive fork: a forked worker that touches it (even cv2.setNumThreads) can
    # hang. With one OpenCV thread in this process before the fork, the workers never use the pool; each worker
    # draws a whole batch, so the parallelism is the workers'.
    cv2.setNumThreads(1)
    return iter(DataLoader(data, batch_size=None, sampler=range(start, stop), num_workers=int(workers),
                           prefetch_factor=4, pin_memory=False))


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def build_edge_net(width: int = 16):
    """The :class:`EdgeNet` module (torch imported here, not at module import)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class EdgeNet(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            chans = (w, 2 * w, 4 * w, 6 * w)
            self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True))
            self.stages = nn.ModuleList()
            prev = w
            for i, c in enumerate(chans):
                layers: list[nn.Module] = [] if i == 0 else [nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
                d = (1, 1, 2, 2)[i]
                # dilations grow inside the coarse stages for context at little cost
                for dil in ((d, 2 * d) if i < 2 else (d, 2 * d, 3 * d)):
                    layers += [nn.Conv2d(c, c, 3, padding=dil, dilation=dil), nn.ReLU(inplace=True)]
                self.stages.append(nn.Sequential(*layers))
                prev = c
            self.sides = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in chans)
            self.fuse = nn.Conv2d(len(chans), 1, 1)
            nn.init.constant_(self.fuse.weight, 1.0 / len(chans))
            nn.init.constant_(self.fuse.bias, 0.0)

        def forward(self, x):
            H, W = x.shape[-2:]
            x = self.stem(x)
            outs = []
            for stage, side in zip(self.stages, self.sides):
                x = stage(x)
                s = side(x)
                if s.shape[-2:] != (H, W):
                    s = F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)
                outs.append(s)
            sides = torch.cat(outs, dim=1)
            return torch.cat([sides, self.fuse(sides)], dim=1)

    return EdgeNet(int(width))


def balanced_bce(logits, target, eta: float, lambda_: float):
    """Class-balanced BCE of (N, K, H, W) logits against (N, 1, H, W) consensus in [0, 1].

    Edges: consensus >= eta (weight = non-edge fraction); ignored: 0 < consensus < eta; non-edges:
    consensus == 0 (weight = lambda_ x edge fraction). Fractions are per image. Returns the sum over the
    K outputs of the per-image-normalised loss, averaged over the batch.
    """
    import torch.nn.functional as F

    pos = (target >= eta).float()
    neg = (target <= 1e-3).float()
    n_pos = pos.sum(dim=(1, 2, 3), keepdim=True)
    n_neg = neg.sum(dim=(1, 2, 3), keepdim=True)
    tot = (n_pos + n_neg).clamp_min(1.0)
    w = pos * (n_neg / tot) + neg * (lambda_ * n_pos / tot)
    w = w.expand_as(logits)
    loss = F.binary_cross_entropy_with_logits(logits, pos.expand_as(logits), weight=w, reduction="sum")
    return loss / (logits.shape[0] * target.shape[-1] * target.shape[-2]) * 100.0


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict_edges(model, image: np.ndarray, device=None) -> np.ndarray:
    """(H, W) float32 fused edge probability of one (H, W, 3) uint8 RGB image with a torch model."""
    import torch

    x = torch.from_numpy(lab_input(image))[None]
    if device is not None:
        x = x.to(device)
    with torch.no_grad():
        out = model(x)[0, -1]
    return torch.sigmoid(out).float().cpu().numpy()


def train_edges(p: EdgeTrainParams, *, resume: bool = True, log: Callable[[str], None] = print,
                val_fn: Callable[[Any, int], float] | None = None, wait: bool = False,
                wait_timeout: float | None = None) -> dict:
    """Train :class:`EdgeNet` on ``p.splits`` of the BSDS-layout folder ``p.root`` into ``p.out``.

    Writes ``p.out/checkpoint.pt`` every ``checkpoint_every`` iterations (atomic), ``p.out/log.jsonl``
    (one JSON line per logged iteration: iteration, loss, lr, seconds), ``p.out/params.json`` and at the end
    ``p.out/edges.pt`` (the model state only) and ``p.out/edges.onnx``.  With ``resume`` an existing checkpoint of
    the same model is continued.  ``val_fn(model, iteration) -> float`` is called every ``val_every`` iterations
    (its figure is logged as ``val``).  One run per output folder: ``p.out/.lock`` (the stages'
    :class:`~clips4.pipeline.lock.StageLock`) is held for the whole run, so a second run on the same folder raises
    ``StageLocked`` (exit 3) or waits with ``wait``.  Returns a summary dict (iterations, seconds, last losses, paths).
    """
    from clips4.pipeline.lock import StageLock

    for name, value, low in (("iterations", p.iterations, 1), ("batch", p.batch, 1), ("crop", p.crop, 8),
                             ("workers", p.workers, 0), ("threads", p.threads, 1)):
        if value < low:
            raise EdgeTrainError(f"train contours: {name} must be >= {low}, got {value}")
    out = Path(p.out).resolve()  # whole paths in the log, the summary and the lock message
    with StageLock(str(out), wait=wait, timeout=wait_timeout):  # creates the folder (removed if left empty)
        return _train_edges(p, out, resume, log, val_fn)


def _train_edges(p: EdgeTrainParams, out: Path, resume: bool, log: Callable[[str], None],
                 val_fn: Callable[[Any, int], float] | None) -> dict:
    import torch

    from clips4.trainer.checkpoint import load_checkpoint, save_checkpoint

    torch.set_num_threads(int(p.threads))
    device = _device(p.device)
    data_img: list[np.ndarray] = []
    data_lab: list[np.ndarray] = []
    for split in p.splits:
        _, ims, labs = load_bsds_split(p.root, split, out / "cache", limit=p.limit_images)
        data_img += ims
        data_lab += labs
    torch.manual_seed(p.seed)
    model = build_edge_net(p.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    start = 0
    elapsed0 = 0.0
    ckpt_path = out / "checkpoint.pt"
    sig = p.signature()
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, expect_signature=sig)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        elapsed0 = float(ck.get("elapsed", 0.0))
        log(f"resumed from {ckpt_path} at iteration {start}")
    elif p.init:
        try:
            state = torch.load(p.init, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except (OSError, RuntimeError, KeyError, AttributeError, pickle.UnpicklingError) as exc:
            raise EdgeTrainError(f"train contours: --init {p.init} is not EdgeNet weights of width {p.width}: "
                                 f"{str(exc).splitlines()[0]}") from None
        log(f"initialised from {Path(p.init).resolve()}")
    n_params = sum(int(q.numel()) for q in model.parameters())
    log(f"EdgeNet width {p.width}: {n_params} parameters, {len(data_img)} images, device {device}")

    def save(step: int, elapsed: float) -> None:
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                    "elapsed": elapsed, "signature": json.dumps(sig),
                                    "params": json.dumps(asdict(p))})

    t0 = time.perf_counter() - elapsed0
    # the resolved parameters beside the weights (what ship_weights writes into the model card)
    (out / "params.json").write_text(json.dumps({**asdict(p), "device_used": str(device),
                                                 "parameters": n_params}, indent=1) + "\n")
    log_f = open(out / "log.jsonl", "a")
    losses: list[float] = []
    pending: list[Any] = []
    it = start
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest kernels once
    stream = batches(CropBatches(data_img, data_lab, p), start, p.iterations, p.workers)
    try:
        model.train()
        for it in range(start, p.iterations):
            # warm-up then cosine decay: robust for short from-scratch schedules
            warm = max(1, p.iterations // 20)
            lr = p.lr * min(1.0, (it + 1) / warm) * 0.5 * (1 + math.cos(math.pi * it / p.iterations))
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = next(stream)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            loss = balanced_bce(logits, y, p.eta, p.lambda_)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pending.append(loss.detach())  # read back at log steps only: a GPU sync per step costs more than the step
            step = it + 1
            rec: dict[str, Any] = {}
            if step % p.log_every == 0 or step == p.iterations:
                losses += torch.stack(pending).cpu().tolist()
                pending = []
                rec = {"iteration": step, "loss": float(np.mean(losses[-p.log_every:])), "lr": lr,
                       "seconds": round(time.perf_counter() - t0, 1)}
            if val_fn is not None and p.val_every and (step % p.val_every == 0 or step == p.iterations):
                model.eval()
                rec.update({"iteration": step, "val": float(val_fn(model, step)),
                            "seconds": round(time.perf_counter() - t0, 1)})
                model.train()
            if rec:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                log(json.dumps(rec))
            if step % p.checkpoint_every == 0 or step == p.iterations:
                save(step, time.perf_counter() - t0)
            if p.snapshot_every and step % p.snapshot_every == 0:
                torch.save(model.state_dict(), out / f"edges-{step:06d}.pt")
            if p.time_limit_s and time.perf_counter() - t0 > p.time_limit_s:
                save(step, time.perf_counter() - t0)
                log(f"time limit reached at iteration {step}")
                break
    finally:
        log_f.close()
    if pending:
        losses += torch.stack(pending).cpu().tolist()
    model.eval().cpu()
    torch.save(model.state_dict(), out / "edges.pt")
    onnx_path = export_onnx(model, out / "edges.onnx")
    return {"iterations": it + 1, "seconds": round(time.perf_counter() - t0, 1), "losses": losses,
            "parameters": n_params, "onnx": str(onnx_path), "weights": str(out / "edges.pt")}


def load_edge_net(path: str | Path, width: int | None = None):
    """EdgeNet with the state dict at ``path`` (``edges.pt`` or a training checkpoint), weights_only; the width
    is read from the weights unless given."""
    import torch

    sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and "format" in sd:
        sd = sd["model"]
    model = build_edge_net(width if width is not None else int(sd["stem.0.weight"].shape[0]))
    model.load_state_dict(sd)
    return model.eval()


def export_onnx(model, path: str | Path) -> Path:
    """Export the fused sigmoid output: input ``image`` (1, 3, H, W) Lab float32 -> ``edges`` (1, 1, H, W).

    H and W are dynamic. Written atomically (temp file + rename).
    """
    import torch

    class Fused(torch.nn.Module):
        def __init__(self, m) -> None:
            super().__init__()
            self.m = m

        def forward(self, x):
            return torch.sigmoid(self.m(x)[:, -1:])

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    wrapped = Fused(model.eval().cpu()).eval()
    dummy = torch.zeros(1, 3, 64, 96)
    torch.onnx.export(wrapped, (dummy,), str(tmp), input_names=["image"], output_names=["edges"],
                      dynamic_axes={"image": {2: "h", 3: "w"}, "edges": {2: "h", 3: "w"}},
                      opset_version=17, dynamo=False)
    os.replace(tmp, path)
    return path


def ship_weights(run_dir: str | Path, dest: str | Path, *, command: str, figures: dict, hardware: str) -> dict:
    """Copy a training run's ONNX export (``run_dir/edges.onnx``) to ``dest/edgenet.onnx`` and write
    the model card (``edgenet.json`` and ``MODEL_CARD.md``: data, command, seed, parameters, where it trained, the
    training time and curve, figures, sha256). The run's parameters come from ``run_dir/params.json`` (written by
    :func:`train_edges`) or its checkpoint."""
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if (run_dir / "params.json").is_file():
        ck = json.loads((run_dir / "params.json").read_text())
    else:
        ck = json.loads(_checkpoint_params(run_dir / "checkpoint.pt"))
    onnx_path = dest / "edgenet.onnx"
    # the run's own export is copied (not re-exported), so the shipped bytes are the ones that were scored
    shutil.copyfile(run_dir / "edges.onnx", onnx_path)
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    keys = ("iterations", "batch", "crop", "lr", "weight_decay", "eta", "lambda_", "scales", "width", "workers", "threads")
    card = {
        "model": "clips4 EdgeNet (trainer/edges.py)",
        "parameters": ck.get("parameters") or sum(int(q.numel()) for q in build_edge_net(ck["width"]).parameters()),
        "file": onnx_path.name,
        "sha256": sha,
        "data": f"BSDS500 splits {list(ck['splits'])} (images + human boundaries; consensus eta {ck['eta']})",
        "command": command,
        "seed": ck["seed"],
        "training": {k: ck[k] for k in keys if k in ck},
        "hardware": hardware,
        "training_seconds": log[-1]["seconds"] if log else None,
        "training_iterations": log[-1]["iteration"] if log else None,
        "loss_curve": [(r["iteration"], round(r["loss"], 3)) for r in log if "loss" in r],
        "figures": figures,
    }
    (dest / "edgenet.json").write_text(json.dumps(card, indent=2) + "\n")
    step = max(1, len(card["loss_curve"]) // 40)
    lines = [
        "# clips4 learned contours (EdgeNet)", "",
        f"- file: `{onnx_path.name}` ({onnx_path.stat().st_size} bytes), sha256 `{sha}`",
        f"- model: {card['model']}, {card['parameters']} parameters; input CIE-Lab (see pipeline/contours.py)",
        f"- data: {card['data']}; trained from scratch, no pretrained weights",
        f"- command: `{command}`",
        f"- seed: {card['seed']}; training: {json.dumps(card['training'])}",
        f"- training time: {card['training_seconds']} s for {card['training_iterations']} iterations on {hardware}",
        f"- figures (BSDS protocol of clips4.evaluate.boundaries): {json.dumps(figures)}",
        "", "Loss curve (iteration, mean batch loss): "
        + ", ".join(f"{i}: {v}" for i, v in card["loss_curve"][::step]), "",
        "Machine-readable card: `edgenet.json` (benchmarks/segments.py checks the val figure against it).", "",
    ]
    (dest / "MODEL_CARD.md").write_text("\n".join(lines))
    return card


def _checkpoint_params(path: Path) -> str:
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["params"]
