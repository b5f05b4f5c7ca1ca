"""The training loop: one readable function (:func:`_train`: set-up, the loop, saving), the run's state and its step
in :class:`_State`. Reads the caches, never calls CLIP. What identifies and publishes a run is :mod:`clips4.trainer.runs`; the distributed side,
:mod:`clips4.trainer.distributed`; loading a trained model, :mod:`clips4.trainer.loading`.

Launch: ``clips4 train ...`` (one process) or ``torchrun --nproc_per_node N -m clips4.trainer ...`` (DDP: gloo on
CPU, nccl on GPU; ``batch_size`` is per process; rank 0 writes checkpoints and logs).
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from clips4.pipeline.config import Config, resolved_dict
from clips4.pipeline.datasets import Dataset
from clips4.pipeline.console import make_console
from clips4.pipeline.stage import code_version, dataset_from_config, input_rows, open_stage, selected_ids
from clips4.trainer.augment import AugmentConfig
from clips4.trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from clips4.trainer.config import TrainParams
from clips4.trainer.data import CachedViews, StepSampler, make_loader
from clips4.trainer.ema import WeightEMA
from clips4.trainer.distributed import StopRequest, dist_setup, gather_rank_states, mean_over_ranks, rank_state
from clips4.trainer.losses import CLIPS4Loss, LossConfig, Prototypes
from clips4.trainer.loading import load_class_texts, load_prototypes
from clips4.trainer.model import ModelConfig, build_model, model_signature
from clips4.trainer.runs import (TrainingDiverged, TrainingError, commit_run, finished_step, publish_run,  # noqa: F401
                                 run_folder, run_meta, same_inputs_or_fail, same_run_or_fail)

console = make_console(stderr=True)


@dataclass
class TrainResult:
    out: Path
    step: int
    losses: list[dict]
    stopped: str = "finished"  # finished | max_steps | nothing_to_do | interrupted
    #: the signal that interrupted the run (SIGTERM 15, SIGINT 2); the CLI exits with 128 + signal
    signal: int | None = None
    #: the named run folder a finished run was published to (``runs/<train.name>``), if any
    published: Path | None = None


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - step / total) ** power


def build_for_training(p: TrainParams, embed_dim: int, input: str = "rgb") -> torch.nn.Module:
    # backbone_weights=random is logged loudly by build_model itself
    return build_model(ModelConfig(backbone=p.backbone, embed_dim=embed_dim, backbone_weights=p.backbone_weights,
                                   head_dim=p.head_dim, input=input))


def _teacher_invariances(prototypes_url: str) -> dict[str, float]:
    """``{family: score}`` measured by the prototypes stage (``invariances.json``; ``{}`` when not measured)."""
    import fsspec

    try:
        with fsspec.open(prototypes_url.rstrip("/") + "/invariances.json", "rb") as f:
            return json.loads(f.read()).get("families", {})
    except FileNotFoundError:
        return {}


def model_input(p: TrainParams, prototypes_url: str, rank: int = 0) -> str:
    """``train.input`` resolved: ``auto`` -> ``local-contrast`` where the teacher ignores colour and brightness
    region by region (family ``local_recolour``), else ``rgb``; said in one plain line."""
    from clips4.trainer.augment import ignores_region_colour

    if p.input != "auto":
        return p.input
    scores = _teacher_invariances(prototypes_url)
    score = scores.get("local_recolour")
    out = "local-contrast" if ignores_region_colour(scores, p.augment.auto_threshold) else "rgb"
    if rank == 0:
        shown = "not measured" if score is None else f"{score:.2f}"
        console.print(f"input: auto -> {out} (teacher invariance to recolouring each region: {shown}; threshold "
                      f"{p.augment.auto_threshold})", markup=False)
    return out


def _auto_augment(augment: AugmentConfig, prototypes_url: str, rank: int) -> AugmentConfig:
    """``photometric`` / ``geometric: auto``: impose only what the teacher is invariant to (``invariances.json`` of
    the prototypes stage); said in one plain line, since it decides what the student learns."""
    from clips4.trainer.augment import gate_by_teacher

    scores = _teacher_invariances(prototypes_url)
    out, kept = gate_by_teacher(augment, scores, augment.auto_threshold)
    if rank == 0:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) or "not measured (prototypes.invariance_images: 0)"
        console.print(f"augment: auto -> imposing {', '.join(kept) or 'nothing'} (teacher invariance "
                      f"scores: {shown}; threshold {augment.auto_threshold})", markup=False)
    return out


def training_views(cfg: Config, dataset: Dataset, deps: dict, rank: int = 0) -> CachedViews:
    """The training data: two augmented views per selected image from the cached segments and CLIP features
    (``augment: auto`` resolved against the prototypes stage's measured teacher invariances)."""
    p: TrainParams = cfg.params("train")  # type: ignore[assignment]
    augment = AugmentConfig(size=p.crop_size, **p.augment.model_dump())
    if "auto" in (augment.photometric, augment.geometric, getattr(augment, "regions", None)):
        augment = _auto_augment(augment, deps["prototypes"], rank)
    return CachedViews(deps["segments"], deps["clip_features"], crop_size=p.crop_size, augment=augment,
                       cache_images=p.cache_images, image_ids=selected_ids(dataset))


def _teacher_prior(loss_fn: CLIPS4Loss, clip_url: str, image_ids: list[str], known: torch.Tensor, max_images: int,
                   rank: int) -> torch.Tensor:
    """``train.logit_adjustment`` / ``collapse_guard``: the teacher's known-class marginal over (at most ``max_images``, evenly spaced)
    training images' cached features, set on the loss as the pseudo-labels' logit adjustment; one plain line."""
    from clips4.pipeline.cache import StageReader
    from clips4.trainer.losses import teacher_class_marginal

    reader = StageReader(clip_url)
    picked = [image_ids[i] for i in np.unique(np.linspace(0, len(image_ids) - 1, min(max_images, len(image_ids)))
                                              .round().astype(int))]
    prior = teacher_class_marginal((reader.get(i, "features") for i in picked), known)
    bias = loss_fn.set_teacher_prior(prior)
    if rank == 0:
        c = loss_fn.cfg
        console.print(f"L_s pseudo-labels: logit adjustment {c.logit_adjustment}, collapse guard {c.collapse_guard} "
                      f"by the teacher's class marginal over {len(picked)} training images (min {float(prior.min()):.3f}, "
                      f"max {float(prior.max()):.3f}; adjustment {float(bias[:len(prior)].min()):+.2f} .. "
                      f"{float(bias[:len(prior)].max()):+.2f})", markup=False)
    return prior


def train(cfg: Config, *, dataset: Dataset | None = None, resume: bool = False, restart: bool = False,
          max_steps: int | None = None, show_progress: bool = True, wait: bool = False,
          wait_timeout: float | None = None, publish: bool = True) -> TrainResult:
    """Train (or continue) the run defined by ``cfg``. ``max_steps`` stops early (tests; a simulated kill). A
    finished run in the cache is published as ``<runs_root>/<train.name>`` unless ``publish`` is False.

    One run per output folder: rank 0 holds ``<out>/.lock`` (the stages' :class:`StageLock`) for the whole run, so
    a second ``clips4 train`` on the same folder exits 3 naming the holder, or waits with ``wait=True``
    (``wait_timeout`` seconds at most) — two runs would interleave ``metrics.jsonl`` and overwrite checkpoints."""
    from clips4.pipeline.lock import StageLock

    dataset = dataset or dataset_from_config(cfg)
    out, fp = run_folder(cfg, dataset)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 holds the lock for all ranks
        return _train(cfg, dataset, out, fp, resume, restart, max_steps, show_progress)
    with StageLock(str(out), wait=wait, timeout=wait_timeout):
        res = _train(cfg, dataset, out, fp, resume, restart, max_steps, show_progress)
    p: TrainParams = cfg.params("train")  # type: ignore[assignment]
    if res.stopped in ("finished", "nothing_to_do") and not p.out and publish:
        res.published = publish_run(out, Path(cfg.runs_root) / p.name, name=p.name, fingerprint=fp)
        console.print(f"run '{p.name}': {res.published / 'final.pt'}", markup=False)
    return res


@dataclass
class _State:
    """One run's training state: the student (``raw``; ``model`` is what the step calls, its DDP wrapper under
    torchrun), the prototypes, the losses, the optimiser, and what every checkpoint of the run carries besides them
    (``constant``: classes, resolved config, code version, the CLIP and the class texts inference needs)."""

    p: TrainParams
    device: torch.device
    rank: int
    world: int
    raw: torch.nn.Module
    protos: Prototypes
    loss_fn: CLIPS4Loss
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    signature: dict
    constant: dict
    schedule: list[dict]
    #: mixed precision (``train.amp``: ``auto`` = with CUDA)
    use_amp: bool = False
    start: int = 0
    model: torch.nn.Module | None = None

    def wrap(self) -> None:
        """``model``: the student itself, or under torchrun its DDP wrapper (SyncBatchNorm on CUDA)."""
        model = self.raw
        if self.world > 1:
            if self.device.type == "cuda":
                # BatchNorm statistics over the global batch, as one process would compute them (SyncBatchNorm is
                # CUDA-only: on CPU/gloo each rank normalises over its own share, which shifts L_e slightly)
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model

    def step(self, batch: dict, step: int, last: Path) -> tuple[dict, float]:
        """One optimiser step on ``batch``: (the loss terms, the learning rate). Raises TrainingDiverged."""
        p, device = self.p, self.device
        lr = poly_lr(p.lr, step, p.iterations, p.poly_power)
        for grp in self.opt.param_groups:
            grp["lr"] = lr * grp["lr_mult"]
        x = batch["image"].to(device, non_blocking=True)
        clip = batch["clip"].to(device, non_blocking=True) if "clip" in batch else None
        with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
            z = self.model(x)
        total, parts = self.loss_fn(z.float(), batch["labels_ds"].to(device), batch["image_index"].to(device), clip)
        if not torch.isfinite(total):
            raise TrainingDiverged(f"loss is not finite at step {step}: {parts}; stopped, the last good checkpoint "
                                   f"({last if last.exists() else 'none yet'}) is kept")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.world > 1:  # the prototypes are not inside the DDP module: their gradients are averaged here
            for q in self.protos.parameters():
                if q.requires_grad and q.grad is not None:
                    dist.all_reduce(q.grad)
                    q.grad /= self.world
        self.scaler.step(self.opt)
        self.scaler.update()
        with torch.no_grad():
            self.protos.renormalize_()
        if self.ema is not None:
            self.ema.update(self.raw)
        return parts, lr

    def save(self, step: int, path: Path, evaluated: bool = False, calibration: dict | None = None) -> None:
        """Write a checkpoint (rank 0; every rank takes part in gathering the ranks' memory banks and RNG states,
        which differ under DDP, so that a resumed run continues exactly). ``evaluated``: ``final.pt``, whose
        ``model`` is the weight average when ``train.ema`` is on (the last iterate beside it as ``model_raw``)."""
        ranks = gather_rank_states(self.loss_fn.memory.state_dict(), rng_state(), self.world)
        if self.rank != 0:
            return
        weights, extra = self.raw.state_dict(), {}
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
            if evaluated:
                extra["model_raw"], weights = weights, self.ema.weights
        save_checkpoint(path, {
            **extra, **self.constant, "model": weights, "prototypes": self.protos.state_dict(),
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "memory": ranks[0]["memory"],
            "rng": ranks[0]["rng"], "ranks": ranks, "step": step, "signature": json.dumps(self.signature),
            "iterations": self.p.iterations, "schedule": json.dumps(self.schedule),
            "guard": self.loss_fn.guard_state(), **({"calibration": calibration} if calibration is not None else {}),
        })

    def resume_from(self, last: Path) -> None:
        """Continue from ``last.pt``: weights, prototypes, optimiser, this rank's memory bank and RNG, the step, and
        the learning-rate schedule (which follows a changed ``train.iterations`` from here on)."""
        p, rank = self.p, self.rank
        ck = load_checkpoint(last, expect_signature=self.signature, map_location=self.device)
        self.raw.load_state_dict(ck["model"])
        self.protos.load_state_dict(ck["prototypes"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        mine = rank_state(ck, rank, self.world)
        self.loss_fn.memory.load_state_dict(mine["memory"])
        self.loss_fn.load_guard_state(ck.get("guard"))
        if self.ema is not None:
            if ck.get("ema") is not None:
                self.ema.load_state_dict(ck["ema"])
            else:  # cannot happen for a run of this fingerprint (train.ema is part of it); said, not hidden
                if rank == 0:
                    console.print(f"[yellow]warning:[/] {last} holds no weight average: train.ema starts from the "
                                  "resumed weights")
                self.ema = WeightEMA(self.raw, p.ema)
        set_rng_state(mine["rng"])
        self.start = int(ck["step"])
        self.schedule = (json.loads(ck.get("schedule", "[]"))
                         or [{"from_step": 0, "iterations": int(ck.get("iterations", p.iterations))}])
        if self.schedule[-1]["iterations"] != p.iterations:
            console.print(f"train.iterations {self.schedule[-1]['iterations']} -> {p.iterations} from step "
                          f"{self.start}: the learning-rate schedule follows the new length")
            self.schedule.append({"from_step": self.start, "iterations": p.iterations})
        console.print(f"resumed from {last} at step {self.start}")


def _build_state(cfg: Config, p: TrainParams, ds: CachedViews, deps: dict, fp: str, device: torch.device, rank: int,
                 world: int) -> _State:
    """The student, the prototypes, the losses and the optimiser of a new run (seeded by ``train.seed``)."""
    names, known, unknown = load_prototypes(deps["prototypes"])
    # what inference needs besides the weights: the class texts the prototypes were built from and the CLIP that
    # embedded them (so Segmenter(final.pt), predict and evaluate need no other flag)
    class_names, class_text = load_class_texts(deps["prototypes"])
    if known.numel() and known.shape[1] != ds.embed_dim or unknown.numel() and unknown.shape[1] != ds.embed_dim:
        raise TrainingError(f"prototypes in {deps['prototypes']} do not match the CLIP feature width {ds.embed_dim}")
    torch.manual_seed(p.seed)
    np.random.seed(p.seed)
    model = build_for_training(p, ds.embed_dim, model_input(p, deps["prototypes"], rank)).to(device)
    protos = Prototypes(known, unknown if unknown.numel() else None).to(device)
    loss_cfg, text = LossConfig.from_params(p), None
    if p.w_x > 0:  # L_x distils the teacher's distribution over the known classes' texts
        if class_names:
            text = torch.from_numpy(class_text)
        else:
            loss_cfg.w_x = 0.0
            if rank == 0:
                console.print("L_x: off (class-free prototypes: no known class texts to distil)", markup=False)
    loss_fn = CLIPS4Loss(loss_cfg, protos, text).to(device)
    if (p.logit_adjustment > 0 or p.collapse_guard > 0) and p.w_s > 0 and known.numel():
        _teacher_prior(loss_fn, deps["clip_features"], ds.image_ids, known, p.prior_images, rank)
    groups = [{"params": list(model.parameters()), "lr_mult": 1.0, "weight_decay": p.weight_decay}]
    proto_params = [q for q in protos.parameters() if q.requires_grad]
    if proto_params:
        groups.append({"params": proto_params, "lr_mult": p.prototype_lr_mult, "weight_decay": 0.0})
    use_amp = p.amp == "on" or (p.amp == "auto" and device.type == "cuda")
    constant = {"config": json.dumps(resolved_dict(cfg)), "git": code_version(), "classes": names,
                "clip": json.dumps(_clip_spec(deps["clip_features"]))}
    if class_names:
        constant["class_text"] = {"names": class_names, "vectors": torch.from_numpy(np.ascontiguousarray(class_text))}
    return _State(
        p=p, device=device, rank=rank, world=world, raw=model, protos=protos, loss_fn=loss_fn,
        opt=torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp), use_amp=use_amp,
        # train.ema: an average of the unwrapped module's weights on every rank (identical under DDP), saved by rank 0
        ema=WeightEMA(model, p.ema) if p.ema > 0 else None,
        signature={**model_signature(model.cfg), "n_known": int(known.shape[0]), "n_unknown": int(unknown.shape[0]),
                   "fingerprint": fp},
        constant=constant, schedule=[{"from_step": 0, "iterations": p.iterations}])


def _earlier_run(cfg: Config, dataset: Dataset, out: Path, deps: dict, p: TrainParams, resume: bool,
                 restart: bool) -> int | None:
    """What ``out`` already holds, checked against this run: the step of a finished run that needs nothing more
    (``final.pt`` at ``train.iterations`` or beyond), else None. Raises TrainingError where a finished or unfinished
    run is there and neither ``resume`` nor ``restart`` says what to do with it, or where it is another run."""
    final, last = out / "final.pt", out / "last.pt"
    if final.exists() and not restart:
        meta = run_meta(out)
        same_run_or_fail(out, meta, p, deps)
        same_inputs_or_fail(out, meta, input_rows(cfg, "train", dataset))
        done_at = finished_step(out, meta)
        if done_at >= p.iterations:
            return done_at
        if not resume:
            raise TrainingError(f"{out} holds a run finished at step {done_at}; pass --resume to continue it to "
                                f"{p.iterations} iterations, or --restart")
    if last.exists() and not restart and not resume:
        raise TrainingError(f"{out} holds an unfinished run (last.pt); pass --resume to continue it or --restart")
    return None


def _log_step(rec: dict, parts: dict, every: int, metrics_path: Path, tb, plain_log: bool, stop: int,
              began: tuple[float, int]) -> None:
    """Rank 0: the step's record in metrics.jsonl (and TensorBoard every ``every`` = log_every steps); where the
    output is not a terminal (cron, cluster jobs), a plain line every ``every`` steps instead of a progress bar.
    ``began``: the loop's start (perf_counter, step)."""
    step = rec["step"]
    with metrics_path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    if tb is not None and step % every == 0:
        for k, v in rec.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                tb.add_scalar(k, v, step)
    if plain_log and ((step + 1) % every == 0 or step + 1 == stop):
        rate = (step + 1 - began[1]) / max(1e-9, time.perf_counter() - began[0])
        eta = (stop - step - 1) / max(rate, 1e-9)
        console.print(f"train step {step + 1}/{rec['iterations']} " + " ".join(
            f"{k}={parts[k]:.4f}" for k in ("total", "L_t", "L_e", "L_s", "L_u", "L_x") if k in parts)
            + f" lr={rec['lr']:.3g} {rate:.2f} it/s ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
            f"{int(eta % 60):02d}", markup=False)


def _save_run(st: _State, cfg: Config, dataset: Dataset, image_ids: list[str], deps: dict, out: Path, fp: str,
              done: int, signum: int | None) -> str:
    """The checkpoints at the loop's end: ``last.pt`` always; for a finished run the class calibration,
    ``final.pt`` and the run's commit record. Returns how the run stopped: interrupted, finished or max_steps."""
    p, rank, last = st.p, st.rank, out / "last.pt"
    if signum is not None:
        if done > st.start or not last.exists():
            st.save(done, last)
        stopped = "interrupted"
    elif done >= p.iterations:
        if st.start >= p.iterations and rank == 0:
            console.print(f"[yellow]already at step {st.start} >= train.iterations={p.iterations}[/]: finishing here")
        st.save(done, last)
        calibration = None
        if rank == 0 and p.calibration != "none":
            weights = st.ema.weights if st.ema is not None else st.raw.state_dict()
            try:
                calibration = _calibrate(p, st.raw, weights, dataset, image_ids, deps, st.device)
            except Exception as exc:  # noqa: BLE001 - a finished run must not be lost to its calibration
                console.print(f"[yellow]warning:[/] class calibration failed ({type(exc).__name__}: {exc}); final.pt is "
                              "written without it (evaluate language then uses plain arg-max; --prior-matching train "
                              "fits one at evaluation)")
        st.save(done, out / "final.pt", evaluated=True, calibration=calibration)
        if rank == 0:
            if st.ema is not None:
                console.print(f"final.pt holds the weight average (train.ema {p.ema}, {st.ema.updates} updates) as "
                              "the evaluated model; the last iterate as model_raw", markup=False)
            commit_run(out, cfg, fp, st.signature, deps, done, dataset)
        stopped = "finished"
    else:
        st.save(done, last)
        stopped = "max_steps"
    if rank == 0:
        if stopped == "interrupted":
            console.print(f"[yellow]interrupted[/] by {signal.Signals(signum).name} at step {done}: {last} "
                          "written; continue with --resume")
        else:
            console.print(f"{stopped} at step {done}; outputs in {out}")
    return stopped


def _train(cfg: Config, dataset: Dataset, out: Path, fp: str, resume: bool, restart: bool, max_steps: int | None,
           show_progress: bool) -> TrainResult:
    # --- set-up: the data, the student and its optimiser, an earlier run in `out` checked or resumed
    p: TrainParams = cfg.params("train")  # type: ignore[assignment]
    rank, world, local_rank = dist_setup()
    deps = {name: open_stage(cfg, name, dataset).url for name in ("segments", "clip_features", "prototypes")}
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    ds = training_views(cfg, dataset, deps, rank)
    st = _build_state(cfg, p, ds, deps, fp, device, rank, world)
    last, final = out / "last.pt", out / "final.pt"
    done_at = _earlier_run(cfg, dataset, out, deps, p, resume, restart)
    if done_at is not None:
        console.print(f"[green]nothing left to do[/]: {final} exists (finished at step {done_at}, "
                      f"train.iterations={p.iterations})")
        return TrainResult(out, done_at, [], "nothing_to_do")
    if last.exists() and not restart:
        st.resume_from(last)
    if restart and rank == 0:
        # a restarted run must not leave the previous run's final checkpoint (or its commit marker) behind: a
        # restart stopped early would otherwise read as finished to the next `clips4 train`
        for stale in ("final.pt", "index.parquet"):
            (out / stale).unlink(missing_ok=True)
    st.wrap()
    start = st.start
    sampler = StepSampler(len(ds), p.batch_size, p.seed, start, p.iterations, rank, world)
    g = torch.Generator()
    g.manual_seed(p.seed)  # the loader's own generator: creating it must not consume the global RNG
    loader = make_loader(ds, sampler, p.num_workers, pin_memory=device.type == "cuda", generator=g)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({
            "config": resolved_dict(cfg), "git": code_version(), "deps": deps, "signature": st.signature,
            "classes": st.constant["classes"], "lr_schedule": st.schedule}, indent=2))
        kept = [ln for ln in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if ln.strip() and json.loads(ln)["step"] < start]
        metrics_path.write_text("".join(k + "\n" for k in kept))
        if st.ema is not None:
            console.print(f"train.ema {p.ema}: averaging the student's weights after every step (warm-up "
                          f"min({p.ema}, (1+t)/(10+t))); final.pt will hold the average as the evaluated model",
                          markup=False)
    tb = _tensorboard(out) if rank == 0 else None

    # --- the loop: a step per batch, logged, a checkpoint every checkpoint_every steps; a signal stops it cleanly
    losses: list[dict] = []
    stop = min(p.iterations, max_steps) if max_steps is not None else p.iterations
    t_end = t_fetch = time.perf_counter()  # t_fetch: when the loop asked the loader for the next batch
    began = (t_end, start)
    st.model.train()
    st.loss_fn.train()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} it/s"),
                    TimeRemainingColumn(), TextColumn("{task.fields[losses]}"), console=console,
                    disable=not show_progress or rank != 0 or not console.is_terminal)
    plain_log = show_progress and not console.is_terminal
    with prog, StopRequest() as stop_req:
        task = prog.add_task("train", total=p.iterations, completed=start, rate="-", losses="")
        batches = iter(loader)
        for step in range(start, stop):
            if stop_req.requested(world, device):
                if rank == 0:
                    console.print(f"[yellow]{signal.Signals(stop_req.signum).name} received[/]: stopping at step {step} "
                                  "and writing a checkpoint (send it again to stop at once)")
                break
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:  # noqa: BLE001 - DataLoader workers killed by the same signal
                if stop_req.signum is not None:  # local check: no collective on an error path
                    break
                raise
            t_batch = time.perf_counter()
            parts, lr = st.step(batch, step, last)
            t_now = time.perf_counter()
            rec = {"step": step, "lr": lr, "iterations": p.iterations,
                   **mean_over_ranks({k: float(v) for k, v in parts.items()}, world),
                   "data_s": t_batch - t_fetch, "step_s": t_now - t_end}
            t_end = t_now
            losses.append(rec)
            if rank == 0:
                _log_step(rec, parts, p.log_every, metrics_path, tb, plain_log, stop, began)
            prog.update(task, advance=1, rate=f"{(step + 1 - start) / max(1e-9, t_now - began[0]):.2f}",
                        losses=" ".join(f"{k}={parts[k]:.3f}" for k in ("total", "L_t", "L_e", "L_s") if k in parts))
            if (step + 1) % p.checkpoint_every == 0 and step + 1 < p.iterations:
                st.save(step + 1, last)
            t_fetch = time.perf_counter()  # checkpoint/log time is not data wait (it still counts in step_s)
        del batches  # shut the workers down before the checkpoint is written

    # --- saving: last.pt always; at the end, the class calibration and final.pt, then the run's commit record
    done = start + len(losses)
    stopped = _save_run(st, cfg, dataset, ds.image_ids, deps, out, fp, done, stop_req.signum)
    if tb is not None:
        tb.close()
    return TrainResult(out, done, losses, stopped, stop_req.signum)


def _calibrate(p: TrainParams, model: torch.nn.Module, weights: dict, dataset: Dataset, image_ids: list[str],
               deps: dict, device: torch.device) -> dict | None:
    """``train.calibration``: the class calibration of the evaluated weights (:func:`clips4.trainer.calibration.calibrate`)
    on ``train.calibration_images`` training images and the prototypes stage's class texts; one plain line."""
    import copy

    from clips4.pipeline.cache import StageReader
    from clips4.pipeline.images import load_rgb
    from clips4.trainer.calibration import cached_teacher, calibrate, guard_summary
    from clips4.trainer.inference import model_embedder

    names, text = load_class_texts(deps["prototypes"])
    if not names:
        console.print("calibration: none (the prototypes stage has no known classes)", markup=False)
        return None
    net = copy.deepcopy(model)
    net.load_state_dict(weights)
    embed = model_embedder(net.eval(), device)
    reader, segments = StageReader(deps["clip_features"]), StageReader(deps["segments"])
    cached = set(image_ids)
    records = [r for r in dataset.records() if r.image_id in cached]
    cal = calibrate(lambda r: embed(load_rgb(r.path)), records, cached_teacher(reader, segments), names, text,
                    mode=p.calibration, collapse_ratio=p.calibration_ratio, max_margins=p.calibration_max_margins,
                    max_images=p.calibration_images, guard=p.calibration_guard)
    t, s = np.asarray(cal["teacher_freq"]), np.asarray(cal["student_freq"])
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731 - shares of pixels, never ratios of a vanishing share
    moved = [f"{n} {'raised' if b > 0 else 'lowered'} {b:+.3f} (student {pct(s[i])}, teacher {pct(t[i])} of the pixels)"
             for i, (n, b) in enumerate(zip(names, cal["bias"])) if abs(b) > 1e-6]
    what = {"raise": f"classes the student predicts at under {p.calibration_ratio:g} x the teacher's share raised",
            "band": f"classes outside {p.calibration_ratio:g} .. 1/{p.calibration_ratio:g} x the teacher's share moved "
                    "towards it", "match": "every class's share matched to the teacher's"}.get(p.calibration, p.calibration)
    # a bias was fitted but the guard kept none of it: say so, not "within bounds"
    body = "; ".join(moved) if moved else ("every bias 0" if cal.get("agreement") else
                                           "every class within bounds, every bias 0")
    console.print(f"calibration ({p.calibration}: {what}; {cal['n_images']} training images): {body}{guard_summary(cal)} "
                  "(stored in final.pt)", markup=False)
    for n in cal["capped"]:
        i = names.index(n)
        console.print(f"warning: calibration: {n} would need a bias above {p.calibration_max_margins:g} median margins "
                      f"({cal['max_bias']:.4f}) to get its share back; moved by that much only, to "
                      f"{pct(cal['matched_freq'][i])} of the pixels (teacher {pct(t[i])}). The network hardly "
                      "ranks it above its look-alikes: under-trained, or a class its teacher reads in a way the "
                      "student does not learn (train.calibration_max_margins)", markup=False)
    return cal


def _clip_spec(clip_url: str) -> dict:
    """The CLIP the clip_features stage really ran: its params and what its preflight resolved (weights file and
    sha256, the architecture of a ``local-dir:`` folder)."""
    from clips4.pipeline.cache import StageReader

    meta = StageReader(clip_url).meta
    return {"params": (meta.get("params") or {}).get("clip"), "resolved": meta.get("preflight") or {}}


_TB_WARNED = False


def _tensorboard(out: Path):
    global _TB_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # noqa: BLE001 - TensorBoard is optional
        if not _TB_WARNED:  # once per process, not once per step or per run in a sweep
            _TB_WARNED = True
            console.print(f"[yellow]warning:[/] TensorBoard is not available ({exc}); no {out / 'tb'} logs. "
                          f"metrics.jsonl holds every step (pip install tensorboard for the tb/ logs)")
        return None
    return SummaryWriter(str(out / "tb"))
