"""Training params (the ``train`` section of stages.yaml). Defaults follow the paper's section 4.2."""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from clips4.pipeline.config import FloatPair, Strict
from clips4.pipeline.photometric import PhotometricConfig

#: ``train.calibration`` (clips4.trainer.calibration): the one spelling of the modes, torch-free so the CLI checks
#: ``--prior-mode`` before importing the trainer
CalibrationMode = Literal["raise", "band", "match", "none"]
#: the modes that fit a bias (``none`` = plain arg-max)
FIT_MODES: tuple[str, ...] = tuple(m for m in get_args(CalibrationMode) if m != "none")


class AugmentParams(PhotometricConfig):
    """The views' augmentation (``train.augment`` in stages.yaml): the photometric transforms
    (:class:`clips4.pipeline.photometric.PhotometricConfig`, declared there once), the crop geometry and the
    modes. ``clips4.trainer.augment.AugmentConfig`` is built from this model's fields."""

    #: ``auto``: flips and rescaled crops only where the teacher is measured to be invariant to them (prototypes
    #: stage, ``invariances.json``; otherwise no flips / crops at native scale); ``imposed``: as set below (paper)
    geometric: Literal["auto", "imposed"] = "auto"
    #: crop geometry, one of two: ``zoom`` = magnification range of the crops relative to the image's own
    #: resolution (log-uniform; (1, 1) = crops at native scale, as the student sees images at test time), or
    #: ``scale`` = RandomResizedCrop area-fraction range (the paper's SimCLR views, e.g. (0.25, 1.0); zoom: null).
    #: On the synthetic sweep, rescaled crops whose target is the teacher on the unscaled image teach the student
    #: to ignore texture frequency, and classes that differ by it collapse (docs/results.md): hence ``geometric: auto``
    zoom: FloatPair | None = (0.7, 1.4)
    scale: FloatPair | None = None
    #: aspect-ratio range of the crop box (the view itself is square)
    ratio: FloatPair = (3 / 4, 4 / 3)
    flip_p: float = Field(default=0.5, ge=0, le=1)
    #: probability that a training image gets about half of the superpixels of another training image pasted
    #: over it (resized to it) with their teacher features (clips4.trainer.regions.paste_regions): classes then
    #: meet neighbours they never meet in the data, so which classes surround a region stops telling what it is
    paste_p: float = Field(default=0.0, ge=0, le=1)
    #: probability that a training image gets a box of another training image pasted over it (CutMix, the box's
    #: targets the teacher's features of that image: clips4.trainer.regions.paste_box). Needs no segments, so it
    #: breaks the context where the segments stage finds one region per image. On the sweep's context world
    #: (a class only ever beside the classes of its group in training) it turns 55.9 into 74.8 at 300 iterations
    #: (docs/results.md, "Spurious cues")
    cutmix_p: float = Field(default=1.0, ge=0, le=1)
    #: the pasted box's share of the image area (its aspect log-uniform in 1/2 .. 2)
    cutmix_area: float = Field(default=0.5, gt=0, lt=1)
    # jitter, jitter_p, gray_p, blur_p, blur_sigma, channel_shuffle_p, invert_p: PhotometricConfig's
    #: ``auto`` (photometric / geometric): a family is imposed when the teacher's invariance score reaches this
    auto_threshold: float = Field(default=0.9, gt=0)
    #: ``imposed``: photometric transforms on the view only, target = teacher on the clean image (the paper's
    #: SimCLR views: channel_shuffle_p = invert_p = 0); ``auto``: ``imposed`` restricted to the families the
    #: teacher is measured to be invariant to (prototypes stage, ``invariances.json``); ``teacher``: views made
    #: from the teacher's cached photometric variants, target = teacher on that variant (needs
    #: ``clip_features.photometric_variants > 0``); ``none``: no photometric transform.
    #: Default ``auto``: on the synthetic sweep, imposed views make the student merge classes that differ by colour
    #: (docs/results.md), and no views let it take colour shortcuts where its teacher
    #: reads texture; imposing what the teacher ignores handles both
    photometric: Literal["auto", "imposed", "teacher", "none"] = "auto"
    #: every superpixel of a view recoloured on its own (clips4.trainer.regions: random mean colour, texture gain,
    #: polarity and tint per region, its grey-level texture kept): no colour or luminance, absolute or between
    #: regions, is left to read a label from. ``auto``: when the teacher is measured to be invariant to it
    #: (``invariances.json`` family ``local_recolour``); ``imposed``: always; ``none``: never (the paper).
    #: Default ``none``: on the spurious-cue worlds of the sweep it removes the brightness shortcut but slows
    #: learning texture, and at 800 iterations it lost more worlds than it won (docs/results.md, "Spurious cues")
    regions: Literal["auto", "imposed", "none"] = "none"

    @model_validator(mode="after")
    def _one_crop_rule(self):
        if (self.zoom is None) == (self.scale is None):
            raise ValueError("augment: set exactly one of zoom (magnification range) and scale (area-fraction "
                             "range; the paper's RandomResizedCrop) — the other null")
        for name in ("zoom", "scale", "ratio"):
            v = getattr(self, name)
            if v is not None and not 0 < v[0] <= v[1]:
                raise ValueError(f"augment.{name} must be a range 0 < low <= high, got {list(v)}")
        return self


class TrainParams(Strict):
    # --- model
    #: backbone: resnet50 (paper, dilated, output stride 8), resnet18, tiny (tests / CPU)
    backbone: Literal["resnet50", "resnet18", "tiny"] = "resnet50"
    #: ``imagenet`` (torchvision weights, from the local torch hub cache or a download), a file path, or
    #: ``random`` (explicit random init; logged loudly)
    backbone_weights: str = "imagenet"
    head_dim: int = Field(default=512, ge=8)
    #: what the network sees (clips4.trainer.model.ModelConfig.input): ``rgb``, the image; ``local-contrast``,
    #: its grey-level pattern with the local brightness and contrast divided out, so no colour and no brightness,
    #: absolute or between regions, can stand in for what the teacher reads; ``auto``: ``local-contrast`` when the
    #: teacher is measured to ignore both (``invariances.json`` family ``local_recolour`` >= ``augment.auto_threshold``:
    #: each region of an image recoloured on its own leaves its features unchanged), otherwise ``rgb``.
    #: Default ``auto``: where colour or brightness is tied to the class in the training images but the teacher
    #: reads texture, a student that sees colour learns that cue first and fails where the tie breaks; a teacher
    #: that reads colour keeps an ``rgb`` student (docs/results.md, "Spurious cues")
    input: Literal["auto", "rgb", "local-contrast"] = "auto"
    # --- optimisation
    #: iterations (paper: 20k VOC/Context, 80k COCO-Stuff)
    iterations: int = Field(default=20000, ge=1)
    #: images per process and step (two views each); paper: 8
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=0.001, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    #: polynomial decay power: lr_t = lr * (1 - t / iterations) ** poly_power
    poly_power: float = Field(default=0.9, ge=0)
    #: learning rate of the unknown prototypes (L_u), relative to ``lr``
    prototype_lr_mult: float = Field(default=10.0, gt=0)
    # --- data
    crop_size: int = Field(default=321, ge=16)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    #: DataLoader worker processes
    num_workers: int = Field(default=2, ge=0)
    #: keep up to this many images' decoded inputs in memory per worker (small datasets; 0 = read every time)
    cache_images: int = Field(default=0, ge=0)
    # --- losses (weight 0 switches a loss off)
    w_t: float = Field(default=1.0, ge=0)
    w_e: float = Field(default=1.0, ge=0)
    w_s: float = Field(default=1.0, ge=0)
    w_u: float = Field(default=1.0, ge=0)
    #: class-text distillation L_x (not in the paper; 0 = off): per segment, cross entropy of the student's
    #: distribution over the known classes' *text* embeddings against the teacher's (the segment-mean CLIP
    #: feature), both ``softmax(text_temperature · cos(·, T))``. Why: L_s and L_u see the classes only through the
    #: segment prototypes, L_e the whole embedding; none keeps how the student ranks two near-duplicate classes'
    #: texts, which is what evaluation and the class calibration read. Measured on the synthetic worlds:
    #: w_x 3 fixes the long-budget drift of the yellow worlds but copies the teacher's confusions where the student
    #: beats it by separating near-duplicates, hence an option
    w_x: float = Field(default=0.0, ge=0)
    #: of L_x; 100 = CLIP's logit scale, where its text-pixel cosines differ by a few hundredths between classes
    text_temperature: float = Field(default=100.0, gt=0)
    #: concentration of L_t (paper: 10)
    kappa: float = Field(default=10.0, gt=0)
    #: τ in L_s = CE(softmax(τ·cos(v_s, C)), y_s); the paper's Eq. 3 has none (= 1)
    semantic_temperature: float = Field(default=10.0, gt=0)
    #: L_s targets: ``hard`` (the paper's argmax pseudo-labels), ``weighted`` (each segment weighted by the
    #: teacher's confidence), ``soft`` (the teacher's distribution), ``aligned`` (hard after aligning the class
    #: marginals of the batch, student to teacher); see clips4.trainer.losses. ``soft`` (with τ_q 30, below): a
    #: segment the teacher reads by a one-point plurality (two near-duplicates at 0.33 / 0.32) is not taught as the
    #: winner's alone, which is how hard targets collapse the runner-up; measured on 40 world-seeds of the sweep
    #: (docs/results.md, "The sweep of synthetic worlds"); ``hard`` + ``calibration: none`` is the paper (``--config paper``)
    pseudo_labels: Literal["hard", "weighted", "soft", "aligned"] = "soft"
    #: τ_q of the teacher's distribution ``softmax(τ_q·cos(i_s, C))`` that ``weighted``, ``soft`` and ``aligned`` read
    #: (None = ``semantic_temperature``). 30, not 10: at 10 soft targets are nearly flat where the teacher hardly
    #: separates two near-duplicates and keep the student flat too (coarse-grid 0, near-duplicates 3 fail); at 30
    #: they are sharp where the teacher is sure and split only where it is not
    soft_target_temperature: float | None = Field(default=30.0, gt=0)
    #: α of the logit adjustment of the L_s pseudo-labels: ``y_s = argmax_l (τ·cos(i_s, c_l) - α·log(K·π_l))``,
    #: ``π`` the teacher's known-class marginal over the training caches (each cached cell's closest known
    #: prototype, measured once at the start of training; unknown prototypes unadjusted). A class the teacher
    #: over-predicts (it reads a near-duplicate as it) loses segments, one it under-predicts gains them back.
    #: 0 = the paper's pseudo-labels
    logit_adjustment: float = Field(default=0.0, ge=0)
    #: collapse guard ``g`` on the L_s pseudo-labels: a known class the student predicts (EMA of its arg-max shares
    #: over its segments) at under ``g`` x the teacher's share ``π`` gets ``log(g·π / share)`` added to its teacher
    #: logit, so the segments the teacher places relatively closest to it are labelled with it again; no class is
    #: lowered. Against the mode-seeking collapse of a class its teacher reads right on a minority of its pixels.
    #: 0 = off (the paper)
    collapse_guard: float = Field(default=0.0, ge=0, le=1)
    #: at most this many training images (evenly spaced over the sorted ids) measure ``π`` (logit adjustment,
    #: collapse guard)
    prior_images: int = Field(default=512, ge=1)
    #: class calibration fitted once at the end of training and stored in ``final.pt`` (clips4.trainer.calibration;
    #: ``clips4 evaluate language`` applies it): ``raise`` (the collapse guard: a class the student predicts at under
    #: ``calibration_ratio`` x the teacher's frequency on ``calibration_images`` training images gets a bias >= 0 on
    #: its text score that gives it back its share; every other class 0), ``match`` (every class's frequency matched
    #: to the teacher's), ``band`` (``raise``, and a class it predicts at over the teacher's frequency /
    #: ``calibration_ratio`` gets a bias <= 0), ``none`` (the paper: plain arg-max). ``band``, not ``raise``: the
    #: pixels a collapsed class loses go to its look-alike, which ``raise`` leaves over-predicted (40 world-seeds,
    #: world-seeds over the per-class target: hard targets 3 with ``raise``, 1 with ``band``; soft τ_q 30 targets 0
    #: with ``band``; ``match`` costs about 2 mIoU)
    calibration: CalibrationMode = "band"
    calibration_ratio: float = Field(default=0.85, gt=0, le=1)
    #: 512, not 64: a training image holds few regions, so class shares over 64 images vary by tens of percent from
    #: one sample to another and the raised bias with them (voronoi-yellows 1, three training seeds: worst class drop
    #: 0.3 / 4.9 / 5.3 with 64 evenly spaced images, 1.5 / 3.7 / 0.1 with 512)
    calibration_images: int = Field(default=512, ge=1)
    #: ``raise`` never raises a class by more than this many median margins of the student's scores (top-1 minus
    #: top-2): past that, a bias overrides the network instead of correcting its threshold (a 30-step student got
    #: +21 on cosines). 2, not 1: helpful raises measured on the sweep used up to 0.88 (docs/results.md)
    calibration_max_margins: float = Field(default=2.0, gt=0)
    #: keep only the fraction of the fitted bias (0, 1/4, 1/2, 3/4 or all) whose arg-max agrees best (mean IoU)
    #: with the teacher's labels on the calibration images: a class the student does not recognise yet, raised to
    #: its share, takes another class's pixels (clips4.trainer.calibration.agreement_scale)
    calibration_guard: bool = True
    n_segments: int = Field(default=36, ge=2)
    kmeans_iters: int = Field(default=10, ge=1)
    memory_batches: int = Field(default=2, ge=0)
    unknown_update: Literal["grad", "ema"] = "grad"
    #: decay of an exponential moving average of the student's weights (parameters and buffers; Polyak / mean-
    #: teacher averaging), updated after every optimiser step with the warm-up ``min(ema, (1 + t) / (10 + t))``;
    #: ``final.pt`` then holds the averaged weights as the evaluated model (the last iterate as ``model_raw``),
    #: checkpoints hold the average so a resumed run continues it. 0 = off (the paper: the last iterate)
    ema: float = Field(default=0.0, ge=0, lt=1)
    # --- bookkeeping
    seed: int = 0
    #: mixed precision: ``auto`` = on with CUDA, off on CPU
    amp: Literal["auto", "on", "off"] = "auto"
    checkpoint_every: int = Field(default=500, ge=1)
    log_every: int = Field(default=10, ge=1)
    #: the run's name: a finished run is published as ``<runs_root>/<name>/final.pt`` (with its config, metrics
    #: and ``run.json``), replaced when the config or its inputs change and the run is trained again
    name: str = Field(default="train", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    #: output folder of the training itself; None = ``<cache_root>/<dataset key>/train/<fingerprint>`` (then
    #: published under ``name``). A folder given here is used as it is and nothing is published
    out: str | None = None
    device: str = "auto"


#: train keys that change how a run is carried out, not what it computes (the batches and their augmentation seeds
#: are functions of (seed, step) alone): a finished run is the same run whatever they are
OPERATIONAL = ("iterations", "out", "name", "num_workers", "cache_images", "checkpoint_every", "log_every", "device")


class TrainStage:
    """The train stage as stages.yaml names it: run by ``clips4 train`` (:func:`clips4.trainer.train.train`)."""

    kind = "external"
    version = "1"
    Params = TrainParams
    #: params left out of the run's identity (at their defaults in its fingerprint)
    operational = OPERATIONAL
