"""CLIP-S4 losses (paper Sec. 3): pixel-segment contrastive L_t, embedding consistency L_e, semantic
consistency L_s and the unknown-prototype update L_u, plus the per-image spherical k-means that makes segments.

Shapes used throughout (``N`` rows = views, ``D`` embedding width, ``h x w`` embedding grid, ``k`` segments):

- ``z (N,D,h,w) float32`` unit-norm pixel embeddings from the network (with grad);
- ``labels (N,h,w) int64`` superpixel (UCM region) ids of every embedding cell, negative = ignore;
  the two views of one image share ids because the labels went through the same geometric transform;
- ``image_index (N,) int64`` which source image a row comes from (views of one image share it);
- ``clip (N,D,h,w) float32`` CLIP pixel embeddings resampled to the same grid (other sizes are resampled
  bilinearly here, re-normalised);
- ``assign (N,h,w) int64`` segment id in ``[0,k)`` of each cell.

Design choices (see ``LossConfig`` for the knobs):

- Segments: spherical k-means per view with grid initialisation (as SegSort/HSG), on the detached embeddings
  concatenated with ``spatial_weight`` x normalised (y, x) coordinates so segments stay spatially coherent;
  ``k = 36``. Segment embeddings ``v_s`` are the normalised means of the (non-detached) pixel embeddings.
- L_t (Eq. 1, κ = 10): anchors are the valid cells; a segment's region is the majority label over its valid
  cells; positives of an anchor = segments (either view of the same image) whose region equals the anchor's;
  negatives = every other segment of the batch + the memory bank (segments of the previous 2 batches,
  detached). Anchors with no positive segment are skipped. Optionally ``max_anchors`` random anchors.
- L_e (Eq. 2): mean over segments of ``1 - cos(v_s, i_s)``, ``i_s`` the normalised mean CLIP embedding of the
  same cells.
- L_s (Eq. 3): ``y_s = argmax_l cos(i_s, c_l)`` over known + unknown prototypes (no grad); cross entropy of
  ``softmax(τ · cos(v_s, C))``. The paper writes ``softmax(sim)`` (τ = 1, ``semantic_temperature: 1``); on
  cosines in [-1, 1] that softmax is almost uniform and its gradient weak. Default ``τ = 10`` = κ, kept because
  the synthetic sweep measured it: τ = 1 was equal or worse in every world (docs/results.md). Prototypes are detached.
- L_u (Eq. 4): ``mean_{s: y_s unknown} (1 - cos(c_{y_s}, i_s))`` with ``i_s`` detached: its gradient reaches only
  the unknown prototypes (an ``nn.Parameter`` in :class:`Prototypes`, normalised on use, re-normalise after
  the optimiser step with ``Prototypes.renormalize_()``). ``unknown_update='ema'`` instead moves them by an
  EMA towards the mean of their assigned segments (no optimiser needed); then L_u is only reported.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import make_dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LossConfig",
    "grid_init",
    "spherical_kmeans",
    "segment_means",
    "segment_majority",
    "MemoryBank",
    "Prototypes",
    "contrastive_loss",
    "embedding_consistency_loss",
    "semantic_consistency_loss",
    "text_distillation_loss",
    "unknown_prototype_loss",
    "teacher_class_marginal",
    "logit_adjustment_bias",
    "CLIPS4Loss",
]


#: the loss's hyper-parameters that are training params: their types and defaults are ``TrainParams``' (declared
#: there once); :class:`LossConfig` is built from them
TRAIN_FIELDS = ("w_t", "w_e", "w_s", "w_u", "w_x", "text_temperature", "kappa", "semantic_temperature", "pseudo_labels",
                "soft_target_temperature", "logit_adjustment", "collapse_guard", "n_segments", "kmeans_iters",
                "memory_batches", "unknown_update")
#: the loss's own constants (not training params): (name, type, default, what)
LOSS_CONSTANTS = (
    ("guard_momentum", float, 0.98, "collapse guard: EMA of the student's class shares (per step)"),
    ("guard_rate", float, 0.02, "collapse guard: bias step per training step, in log-share units"),
    ("guard_cap", float, 0.2, "collapse guard: at most this much cosine (x τ) added to a class's teacher logit"),
    ("spatial_weight", float, 1.0, "weight of (y, x) in [-1, 1] appended to embeddings for k-means"),
    ("max_anchors", "int | None", None, "subsample anchor pixels for L_t (None = all)"),
    ("ema_momentum", float, 0.01, "momentum of the unknown prototypes' EMA update"),
)


def _loss_fields() -> list[tuple]:
    from dataclasses import field

    from clips4.trainer.config import TrainParams

    pf = TrainParams.model_fields
    return ([(n, pf[n].annotation, field(default=pf[n].default)) for n in TRAIN_FIELDS]
            + [(n, tp, field(default=d)) for n, tp, d, _ in LOSS_CONSTANTS])


def _from_params(cls, p) -> "LossConfig":
    """From ``TrainParams`` (or any object with its fields): every training param the loss reads, by name."""
    return cls(**{n: getattr(p, n) for n in TRAIN_FIELDS})


#: Weights (0 switches a loss off) and hyper-parameters. Paper: L = L_t + L_e + L_s (+ L_u for prototypes). The
#: fields of :data:`TRAIN_FIELDS` with ``TrainParams``' defaults, then :data:`LOSS_CONSTANTS`; build it from a
#: run's params with ``LossConfig.from_params(p)``.
LossConfig = make_dataclass("LossConfig", _loss_fields(), namespace={
    "from_params": classmethod(_from_params),
    "__doc__": "Weights and hyper-parameters of the CLIP-S4 loss (fields: TRAIN_FIELDS from TrainParams, then "
               "LOSS_CONSTANTS); LossConfig.from_params(train_params)."})
LossConfig.__module__ = __name__


# ------------------------------------------------------------------------------------------- clustering
def _grid_shape(k: int, h: int, w: int) -> tuple[int, int]:
    """Rows x cols of a grid with exactly k cells, the most square in pixel terms for an h x w map."""
    best = None
    for gy in range(1, k + 1):
        if k % gy:
            continue
        gx = k // gy
        cost = abs(math.log((h / gy) / (w / gx)))
        if best is None or cost < best[0]:
            best = (cost, gy, gx)
    return best[1], best[2]


def grid_init(h: int, w: int, k: int, device=None) -> torch.Tensor:
    """``(h,w) int64`` initial assignment: the map cut into a ``gy x gx = k`` grid (cell ids row-major)."""
    gy, gx = _grid_shape(k, h, w)
    ys = (torch.arange(h, device=device) * gy) // h
    xs = (torch.arange(w, device=device) * gx) // w
    return ys[:, None] * gx + xs[None, :]


def _coords(h: int, w: int, device) -> torch.Tensor:
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy, xx])  # (2,h,w)


@torch.no_grad()
def spherical_kmeans(z: torch.Tensor, k: int = 36, iters: int = 10, spatial_weight: float = 0.0) -> torch.Tensor:
    """Per-image spherical k-means with grid initialisation (deterministic).

    z: ``(B,D,h,w)`` float (normalised or not; normalised here). spatial_weight: weight of the (y, x) position
    in [-1, 1] appended to each embedding (0 = pure embedding clustering).
    Returns ``(B,h,w) int64`` assignments in ``[0, k)`` (some clusters may end up empty).
    """
    B, D, h, w = z.shape
    x = F.normalize(z.detach().float(), dim=1)
    if spatial_weight > 0:
        x = torch.cat([x, spatial_weight * _coords(h, w, z.device).expand(B, 2, h, w)], 1)
    x = F.normalize(x.flatten(2), dim=1).transpose(1, 2)  # (B, P, D')
    k = min(k, h * w)
    assign = grid_init(h, w, k, z.device).flatten().expand(B, -1).clone()  # (B, P)
    for _ in range(iters):
        onehot = F.one_hot(assign, k).float()  # (B,P,k)
        sums = onehot.transpose(1, 2) @ x  # (B,k,D')
        counts = onehot.sum(1)  # (B,k)
        cent = F.normalize(sums, dim=2)
        sim = x @ cent.transpose(1, 2)  # (B,P,k)
        sim = sim.masked_fill((counts == 0)[:, None, :], float("-inf"))
        new = sim.argmax(2)
        if torch.equal(new, assign):
            break
        assign = new
    return assign.view(B, h, w)


def segment_means(x: torch.Tensor, assign: torch.Tensor, k: int, mask: torch.Tensor | None = None):
    """Normalised mean embedding per segment (differentiable).

    x: ``(B,D,h,w)``; assign: ``(B,h,w) int64`` in [0,k); mask: optional ``(B,h,w) bool`` cells to use.
    Returns ``(means (B,k,D) float32 unit-norm (zeros where empty), counts (B,k) float32)``.
    """
    B, D = x.shape[:2]
    onehot = F.one_hot(assign.flatten(1), k).float()  # (B,P,k)
    if mask is not None:
        onehot = onehot * mask.flatten(1)[..., None].float()
    sums = onehot.transpose(1, 2) @ x.float().flatten(2).transpose(1, 2)  # (B,k,D)
    return F.normalize(sums, dim=2), onehot.sum(1)


def segment_majority(labels: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Majority valid (>= 0) label of each segment. labels/assign: ``(B,h,w)``. Returns ``(B,k) int64``, -1 where a
    segment has no valid cell."""
    B = labels.shape[0]
    out = torch.full((B, k), -1, dtype=torch.int64, device=labels.device)
    for b in range(B):
        lab, a = labels[b].flatten(), assign[b].flatten()
        valid = lab >= 0
        if not valid.any():
            continue
        uniq, inv = torch.unique(lab[valid], return_inverse=True)
        hist = torch.zeros(k * len(uniq), device=labels.device, dtype=torch.int64)
        hist.index_add_(0, a[valid] * len(uniq) + inv, torch.ones_like(inv))
        hist = hist.view(k, len(uniq))
        best = hist.argmax(1)
        out[b] = torch.where(hist.sum(1) > 0, uniq[best], torch.full_like(best, -1))
    return out


# ------------------------------------------------------------------------------------------ memory bank
class MemoryBank:
    """Detached segment embeddings of the previous ``n_batches`` batches (negatives for L_t).

    ``push(emb (M,D))`` appends a batch (dropping the oldest beyond ``n_batches``); ``get() -> (sum M, D)``.
    """

    def __init__(self, n_batches: int = 2):
        self.n_batches = int(n_batches)
        self.batches: deque = deque(maxlen=max(self.n_batches, 1))

    def push(self, emb: torch.Tensor) -> None:
        if self.n_batches > 0:
            self.batches.append(emb.detach().float().clone())

    def get(self, device=None) -> torch.Tensor | None:
        if self.n_batches == 0 or not self.batches:
            return None
        out = torch.cat(list(self.batches), 0)
        return out.to(device) if device is not None else out

    def __len__(self) -> int:
        return len(self.batches) if self.n_batches > 0 else 0

    def clear(self) -> None:
        self.batches.clear()

    def state_dict(self) -> dict:
        return {"n_batches": self.n_batches, "batches": [b.cpu() for b in self.batches]}

    def load_state_dict(self, state: dict) -> None:
        self.n_batches = int(state["n_batches"])
        self.batches = deque([b for b in state["batches"]], maxlen=max(self.n_batches, 1))


# ------------------------------------------------------------------------------------------- prototypes
class Prototypes(nn.Module):
    """Target class prototypes C = [C_k (known, fixed buffer) ; C_u (unknown, nn.Parameter)] in CLIP pixel space.

    known: ``(k,D)``; unknown: ``(u,D)`` initial unknown prototypes (e.g. CLIP embeddings of random segments).
    ``forward() -> (k+u, D) float32`` unit-norm. ``n_known``/``n_unknown`` give the split.
    """

    def __init__(self, known: torch.Tensor, unknown: torch.Tensor | None = None):
        super().__init__()
        known = F.normalize(torch.as_tensor(known).float(), dim=1)
        self.register_buffer("known", known)
        if unknown is None:
            unknown = known.new_zeros((0, known.shape[1]))
        self.unknown = nn.Parameter(F.normalize(torch.as_tensor(unknown).float(), dim=1))

    @property
    def n_known(self) -> int:
        return self.known.shape[0]

    @property
    def n_unknown(self) -> int:
        return self.unknown.shape[0]

    def forward(self) -> torch.Tensor:
        return torch.cat([self.known, F.normalize(self.unknown, dim=1)], 0)

    @torch.no_grad()
    def renormalize_(self) -> None:
        self.unknown.copy_(F.normalize(self.unknown, dim=1))

    @torch.no_grad()
    def ema_update_(self, idx: torch.Tensor, targets: torch.Tensor, momentum: float) -> None:
        """Move unknown prototype ``idx[j]`` (index into the unknown set) towards ``targets[j]`` (mean per prototype)."""
        if idx.numel() == 0:
            return
        sums = torch.zeros_like(self.unknown).index_add_(0, idx, targets.float())
        counts = torch.zeros(self.n_unknown, device=idx.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        hit = counts > 0
        mean = F.normalize(sums[hit], dim=1)
        self.unknown[hit] = F.normalize((1 - momentum) * self.unknown[hit] + momentum * mean, dim=1)


# ------------------------------------------------------------------------------- teacher class prior
@torch.no_grad()
def teacher_class_marginal(features, known: torch.Tensor) -> torch.Tensor:
    """``(K,) float64``: the share of the teacher's cells whose closest known prototype is each class.

    ``features``: iterable of ``(..., D)`` arrays/tensors (the cached dense CLIP features of some images; any
    leading shape), ``known (K, D)``. Every cell counts once (no label is read). A class never chosen gets 0."""
    C = F.normalize(torch.as_tensor(known).float(), dim=1)
    count = torch.zeros(C.shape[0], dtype=torch.float64)
    for f in features:
        x = torch.as_tensor(f).float().reshape(-1, C.shape[1])
        count += torch.bincount((x @ C.t()).argmax(1), minlength=C.shape[0]).double()
    return count / count.sum().clamp_min(1)


def logit_adjustment_bias(prior: torch.Tensor, alpha: float, n_total: int | None = None,
                          floor: float = 1e-3) -> torch.Tensor:
    """``(L,) float32`` additive bias on the teacher's scaled logits ``τ·cos(i_s, c_l)`` for the L_s pseudo-labels:
    ``-alpha · log(K · π_c)`` for the ``K`` known classes (``π`` = :func:`teacher_class_marginal`), 0 for the
    ``L - K`` unknown prototypes (logit adjustment, Menon et al. 2021, towards a uniform class prior: a class the
    teacher over-predicts is lowered, one it under-predicts raised; a class at the uniform share ``1/K`` and the
    unknowns keep their logits). ``π`` is floored at ``floor / K`` (a class the teacher never picks is raised by at
    most ``alpha · log(1/floor)``)."""
    pi = torch.as_tensor(prior, dtype=torch.float64)
    K = pi.numel()
    b = -float(alpha) * torch.log((K * pi).clamp_min(floor))
    n_total = K if n_total is None else int(n_total)
    return torch.cat([b, b.new_zeros(n_total - K)]).float()


# ----------------------------------------------------------------------------------------------- losses
def contrastive_loss(z: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor, assign: torch.Tensor,
                     k: int, *, kappa: float, memory: torch.Tensor | None = None,
                     max_anchors: int | None = None, generator: torch.Generator | None = None):
    """Pixel-segment contrastive loss (Eq. 1).

    z ``(N,D,h,w)``, labels ``(N,h,w)`` (negative = ignore), image_index ``(N,)``, assign ``(N,h,w)``; memory
    ``(M,D)`` detached negatives or None. Returns ``(loss scalar, v (N,k,D), counts (N,k), seg_labels (N,k))``;
    the loss is 0 (with grad) when no anchor has a positive segment.
    """
    N, D, h, w = z.shape
    v, counts = segment_means(z, assign, k)
    seg_lab = segment_majority(labels, assign, k)
    seg_ok = counts > 0
    # flatten segments of the batch
    v_all = v[seg_ok]  # (S,D)
    seg_img = image_index[:, None].expand(N, k)[seg_ok]
    seg_reg = seg_lab[seg_ok]
    # anchors
    zf = z.permute(0, 2, 3, 1).reshape(-1, D)
    lab = labels.reshape(-1)
    img = image_index[:, None].expand(N, h * w).reshape(-1)
    idx = torch.nonzero(lab >= 0).squeeze(1)
    if max_anchors is not None and idx.numel() > max_anchors:
        idx = idx[torch.randperm(idx.numel(), generator=generator, device="cpu")[:max_anchors].to(idx.device)]
    if idx.numel() == 0 or v_all.shape[0] == 0:
        return z.sum() * 0.0, v, counts, seg_lab
    za, la, ia = zf[idx], lab[idx], img[idx]
    pos = (ia[:, None] == seg_img[None, :]) & (la[:, None] == seg_reg[None, :]) & (seg_reg[None, :] >= 0)
    keys = v_all if memory is None or memory.numel() == 0 else torch.cat([v_all, memory.to(v_all)], 0)
    logits = kappa * za @ keys.t()  # (A, S[+M])
    if keys.shape[0] > v_all.shape[0]:
        pos = torch.cat([pos, pos.new_zeros((pos.shape[0], keys.shape[0] - v_all.shape[0]))], 1)
    has_pos = pos.any(1)
    if not has_pos.any():
        return z.sum() * 0.0, v, counts, seg_lab
    logits, pos = logits[has_pos], pos[has_pos]
    lse_all = torch.logsumexp(logits, 1)
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1)
    return (lse_all - lse_pos).mean(), v, counts, seg_lab


def embedding_consistency_loss(v: torch.Tensor, i: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean over valid segments of ``1 - cos(v_s, i_s)``. v, i: ``(N,k,D)`` unit-norm; valid ``(N,k) bool``."""
    if not valid.any():
        return v.sum() * 0.0
    return (1 - (v * i).sum(-1))[valid].mean()


def semantic_consistency_loss(v: torch.Tensor, i: torch.Tensor, valid: torch.Tensor, prototypes: torch.Tensor,
                              temperature: float, pseudo_labels: str = "hard", bias: torch.Tensor | None = None,
                              target_temperature: float | None = None):
    """Eq. 3. v, i: ``(N,k,D)``; valid ``(N,k)``; prototypes ``(L,D)`` unit-norm (detached here).

    ``pseudo_labels``: ``hard`` (the paper: cross entropy with ``y_s = argmax_l cos(i_s, c_l)``); ``weighted``
    (the same, each segment weighted by the teacher's confidence ``max_l softmax(τ·cos(i_s, C))``, so segments
    the teacher cannot place — mixtures, boundaries, noise — count less); ``soft`` (cross entropy with the
    teacher's whole distribution ``softmax(τ·cos(i_s, C))``); ``aligned`` (hard labels after distribution
    alignment, as ReMixMatch: the teacher's distribution times the ratio of the teacher's to the student's class
    marginals over the batch's segments, so a class the student stops predicting while the teacher still gives
    it mass gets its segments back — the collapse of one class into a near-duplicate).
    ``bias (L,)``: added to the teacher's scaled logits ``τ·cos(i_s, C)`` before any of the above (the logit
    adjustment of :func:`logit_adjustment_bias`; None = none, the paper). ``target_temperature`` ``τ_q``: the
    teacher's distribution of ``weighted`` / ``soft`` / ``aligned`` is ``softmax((τ_q/τ)·(τ·cos(i_s, C) + bias))``
    (None = ``τ``; larger = sharper, towards ``hard``).
    Returns ``(loss, pseudo (S,) int64 = argmax_l (τ·cos(i_s, c_l) + bias_l), i_valid (S,D))`` over the valid
    segments.
    """
    C = prototypes.detach()
    vs, is_ = v[valid], i[valid].detach()
    if vs.shape[0] == 0:
        return v.sum() * 0.0, torch.zeros(0, dtype=torch.int64, device=v.device), is_
    with torch.no_grad():
        t_logits = temperature * (is_ @ C.t())
        if bias is not None:
            t_logits = t_logits + bias.to(t_logits)
        pseudo = t_logits.argmax(1)
    logits = temperature * vs @ C.t()
    if pseudo_labels == "hard":
        return F.cross_entropy(logits, pseudo), pseudo, is_
    with torch.no_grad():
        scale = 1.0 if target_temperature is None else float(target_temperature) / float(temperature)
        q = torch.softmax(scale * t_logits, 1)  # the teacher's distribution over the prototypes
    if pseudo_labels == "weighted":
        w = q.amax(1)
        loss = (F.cross_entropy(logits, pseudo, reduction="none") * w).sum() / w.sum().clamp_min(1e-12)
    elif pseudo_labels == "soft":
        loss = -(q * F.log_softmax(logits, 1)).sum(1).mean()
    elif pseudo_labels == "aligned":
        with torch.no_grad():
            p_s = torch.softmax(logits.detach(), 1).mean(0)
            target = (q * (q.mean(0) / p_s.clamp_min(1e-6))).argmax(1)
        loss = F.cross_entropy(logits, target)
    else:
        raise ValueError(f"pseudo_labels must be hard, weighted, soft or aligned, got {pseudo_labels!r}")
    return loss, pseudo, is_


def text_distillation_loss(v: torch.Tensor, i: torch.Tensor, valid: torch.Tensor, text: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """L_x (an option, not the paper's): ``mean_s CE(softmax(τ·cos(i_s, T)), softmax(τ·cos(v_s, T)))`` over the valid
    segments; v, i ``(N,k,D)`` unit-norm (i detached here), valid ``(N,k)``, text ``(K,D)`` unit-norm class text
    embeddings. Minus the teacher's entropy, this is the KL divergence: 0 where the student's class-text
    distribution is the teacher's, whatever its embedding does elsewhere."""
    vs, is_ = v[valid], i[valid].detach()
    if vs.shape[0] == 0:
        return v.sum() * 0.0
    T = text.detach().to(vs)
    with torch.no_grad():
        q = torch.softmax(temperature * (is_ @ T.t()), 1)
    return -(q * F.log_softmax(temperature * (vs @ T.t()), 1)).sum(1).mean()


def unknown_prototype_loss(prototypes: torch.Tensor, n_known: int, pseudo: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``mean_{s: pseudo_s >= n_known} (1 - cos(c_{pseudo_s}, i_s))``; prototypes ``(L,D)`` (with grad),
    pseudo ``(S,)``, i ``(S,D)`` detached. 0 when no segment is assigned to an unknown class."""
    unk = pseudo >= n_known
    if not unk.any():
        return prototypes.sum() * 0.0
    return (1 - (prototypes[pseudo[unk]] * i[unk].detach()).sum(1)).mean()


class CLIPS4Loss(nn.Module):
    """All CLIP-S4 losses together.

    ``CLIPS4Loss(cfg, prototypes=None)``: ``prototypes`` a :class:`Prototypes` (required when ``w_s > 0`` or
    ``w_u > 0``). Its ``unknown`` parameter is part of ``self.parameters()`` — add it to the optimiser when
    ``unknown_update == 'grad'``.

    ``forward(z, labels, image_index, clip=None) -> (total, parts)``:
      total = w_t·L_t + w_e·L_e + w_s·L_s + w_u·L_u (+ w_x·L_x, an option) (scalar, float32; L_u's gradient
      reaches only the unknown prototypes); parts: dict of python floats ``L_t, L_e, L_s, L_u, avgsim`` (mean
      cos(v_s, i_s), the paper's alignment measure), ``n_segments``, ``frac_unknown`` (segments pseudo-labelled
      unknown), ``L_x`` only when ``w_x > 0`` — a loss that is switched off is reported as 0 and not computed
      (except ``avgsim`` when CLIP features are given).
    The memory bank is updated at the end of each training-mode forward (current segments pushed, detached).
    """

    def __init__(self, cfg: LossConfig | None = None, prototypes: Prototypes | None = None,
                 text: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg or LossConfig()
        if self.cfg.w_s > 0 and prototypes is None:
            raise ValueError("L_s needs target class prototypes: pass prototypes=Prototypes(known, unknown) or set w_s=0")
        if self.cfg.w_x > 0 and (text is None or len(text) == 0):
            raise ValueError("L_x (w_x > 0) needs the known classes' text embeddings: pass text=(K, D) or set w_x=0")
        #: ``(K, D)`` unit-norm class text embeddings for L_x (None when it is off)
        self.register_buffer("text", None if text is None else F.normalize(torch.as_tensor(text).float(), dim=1),
                             persistent=False)
        if self.cfg.unknown_update not in ("grad", "ema"):
            raise ValueError(f"unknown_update must be 'grad' or 'ema', got {self.cfg.unknown_update!r}")
        self.prototypes = prototypes
        self.memory = MemoryBank(self.cfg.memory_batches)
        #: ``(L,)`` bias on the teacher's logits for the L_s pseudo-labels (:meth:`set_teacher_prior`); None = none
        self.pseudo_bias: torch.Tensor | None = None
        #: collapse guard (:meth:`guard_bias`): the teacher's known-class marginal, the EMA of the student's, the bias
        self.teacher_prior: torch.Tensor | None = None
        self.student_share: torch.Tensor | None = None
        self.guard: torch.Tensor | None = None

    def set_teacher_prior(self, prior: torch.Tensor) -> torch.Tensor:
        """Logit adjustment of the L_s pseudo-labels from the teacher's known-class marginal ``prior (K,)``
        (:func:`teacher_class_marginal`) with ``cfg.logit_adjustment``; returns the ``(L,)`` bias (zeros when the
        weight is 0)."""
        if self.prototypes is None:
            raise ValueError("the teacher prior adjusts the pseudo-labels of L_s: it needs prototypes")
        if len(prior) != self.prototypes.n_known:
            raise ValueError(f"teacher prior has {len(prior)} classes, the prototypes {self.prototypes.n_known}")
        n = self.prototypes.n_known + self.prototypes.n_unknown
        b = logit_adjustment_bias(prior, self.cfg.logit_adjustment, n)
        self.pseudo_bias = b.to(self.prototypes.known.device) if self.cfg.logit_adjustment else None
        if self.cfg.collapse_guard > 0:
            self.teacher_prior = torch.as_tensor(prior, dtype=torch.float32).to(self.prototypes.known.device)
            if self.guard is None:  # no guard until the student drifts (a resumed run keeps its own state)
                self.student_share = self.teacher_prior.clone()
                self.guard = torch.zeros_like(self.teacher_prior)
        return b

    def guard_bias(self) -> torch.Tensor | None:
        """``(L,)`` collapse guard on the teacher's scaled logits for the L_s pseudo-labels: a bias ``>= 0`` per known
        class (0 for the unknown prototypes), raised while the student's share of the class (EMA of its arg-max
        shares over its segments) is below ``cfg.collapse_guard`` x the teacher's share ``π_c`` and lowered back
        towards 0 once it is above (``bias += guard_rate · (log(g·π_c) - log(share_c))``, clamped to
        ``[0, guard_cap · τ]`` so a class the student cannot tell apart does not take every segment; the online
        form of :func:`clips4.trainer.calibration.fit_prior_bias` ``mode="raise"``). A class the student has stopped
        predicting while its teacher still gives it ``π_c`` gets back the segments the teacher places relatively
        closest to it; no class is ever lowered below the teacher's own logits. None when off."""
        if self.guard is None or self.cfg.collapse_guard <= 0:
            return None
        return torch.cat([self.guard, self.guard.new_zeros(self.prototypes.n_unknown)])

    @torch.no_grad()
    def _update_guard(self, v: torch.Tensor, valid: torch.Tensor) -> None:
        if self.guard is None or self.teacher_prior is None or not valid.any():
            return
        K = self.prototypes.n_known
        pred = (v.detach()[valid].float() @ self.prototypes.known.t()).argmax(1)
        share = torch.bincount(pred, minlength=K).float() / pred.numel()
        m = self.cfg.guard_momentum
        self.student_share = m * self.student_share + (1 - m) * share.to(self.student_share)
        step = (torch.log(self.cfg.collapse_guard * self.teacher_prior.clamp_min(1e-4))
                - torch.log(self.student_share.clamp_min(1e-4)))
        cap = self.cfg.guard_cap * self.cfg.semantic_temperature  # a class the student cannot learn takes no more
        self.guard = (self.guard + self.cfg.guard_rate * step).clamp(0, cap)

    def guard_state(self) -> dict:
        """What a resumed run needs of the collapse guard (the student's class shares and the bias so far)."""
        return {k: None if getattr(self, k) is None else getattr(self, k).cpu() for k in ("student_share", "guard")}

    def load_guard_state(self, state: dict | None) -> None:
        if state and state.get("guard") is not None and self.cfg.collapse_guard > 0:
            dev = self.prototypes.known.device
            self.student_share = torch.as_tensor(state["student_share"]).float().to(dev)
            self.guard = torch.as_tensor(state["guard"]).float().to(dev)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor,
                clip: torch.Tensor | None = None, assign: torch.Tensor | None = None):
        cfg = self.cfg
        N, D, h, w = z.shape
        if labels.shape[-2:] != (h, w):
            raise ValueError(f"labels {tuple(labels.shape)} must be on the embedding grid {(h, w)} (use labels_ds)")
        need_clip = cfg.w_e > 0 or cfg.w_s > 0 or cfg.w_x > 0
        if need_clip and clip is None:
            raise ValueError("L_e/L_s/L_x need the CLIP features (clip=...) or set w_e = w_s = w_x = 0")
        k = min(cfg.n_segments, h * w)
        if assign is None:
            assign = spherical_kmeans(z, k, cfg.kmeans_iters, cfg.spatial_weight)
        zero = z.sum() * 0.0
        parts = {"L_t": 0.0, "L_e": 0.0, "L_s": 0.0, "L_u": 0.0, "avgsim": float("nan"), "frac_unknown": 0.0}
        total = zero
        if cfg.w_t > 0:
            l_t, v, counts, _ = contrastive_loss(
                z, labels, image_index, assign, k, kappa=cfg.kappa, max_anchors=cfg.max_anchors,
                memory=self.memory.get(z.device),
            )
            total = total + cfg.w_t * l_t
            parts["L_t"] = float(l_t.detach())
        else:
            v, counts = segment_means(z, assign, k)
        valid = counts > 0
        parts["n_segments"] = int(valid.sum())
        if clip is not None:
            clip = clip.float()
            if clip.shape[-2:] != (h, w):
                clip = F.normalize(F.interpolate(clip, size=(h, w), mode="bilinear", align_corners=False), dim=1)
            i_s, _ = segment_means(clip, assign, k)
            parts["avgsim"] = float((v.detach() * i_s).sum(-1)[valid].mean()) if valid.any() else float("nan")
            if cfg.w_e > 0:
                l_e = embedding_consistency_loss(v, i_s, valid)
                total = total + cfg.w_e * l_e
                parts["L_e"] = float(l_e.detach())
            if cfg.w_x > 0:
                l_x = text_distillation_loss(v, i_s, valid, self.text, cfg.text_temperature)
                total = total + cfg.w_x * l_x
                parts["L_x"] = float(l_x.detach())
            if self.prototypes is not None and (cfg.w_s > 0 or cfg.w_u > 0):
                C = self.prototypes()
                bias, guard = self.pseudo_bias, self.guard_bias()
                if guard is not None:
                    bias = guard if bias is None else bias + guard
                    parts["guard_max"] = float(guard.max())
                l_s, pseudo, i_v = semantic_consistency_loss(v, i_s, valid, C, cfg.semantic_temperature,
                                                             cfg.pseudo_labels, bias, cfg.soft_target_temperature)
                if self.training:
                    self._update_guard(v, valid)
                if cfg.w_s > 0:
                    total = total + cfg.w_s * l_s
                    parts["L_s"] = float(l_s.detach())
                nk = self.prototypes.n_known
                if pseudo.numel():
                    parts["frac_unknown"] = float((pseudo >= nk).float().mean())
                if cfg.w_u > 0 and self.prototypes.n_unknown > 0:
                    l_u = unknown_prototype_loss(C, nk, pseudo, i_v)
                    parts["L_u"] = float(l_u.detach())
                    if cfg.unknown_update == "grad":
                        total = total + cfg.w_u * l_u
                    elif self.training:
                        unk = pseudo >= nk
                        self.prototypes.ema_update_(pseudo[unk] - nk, i_v[unk], cfg.ema_momentum)
        if self.training:
            self.memory.push(v.detach()[valid])
        parts["total"] = float(total.detach())
        return total, parts
