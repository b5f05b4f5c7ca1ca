"""Contour detectors: image -> per-pixel boundary strength and orientation.

A *detector* is a callable ``detector(image) -> ContourMap`` taking an ``(H, W, 3) uint8`` RGB image.
Detectors are built by name through :func:`build_detector` from the :data:`CONTOUR_DETECTORS` registry:

``learned``
    The compact edge network trained by clips4 on BSDS (``clips4 train-contours``), shipped as ONNX and
    run with onnxruntime (:class:`LearnedDetector` below); falls back to ``classical`` with a
    warning when onnxruntime or the shipped weights are missing.
``classical`` (no weights)
    Multi-scale oriented Gaussian-derivative gradients of the CIE-Lab channels plus a cheap texture
    channel (local contrast of L), combined linearly per orientation (as Pb combines its oriented
    half-disc gradients) and mapped to [0, 1].
``hed``
    Holistically-nested edge detection (Xie & Tu 2015) run by OpenCV's DNN module from a local Caffe
    ``prototxt`` + ``caffemodel`` (needs an OpenCV build that still ships the Caffe importer; OpenCV 5
    removed it, in which case the error says so and suggests the ``onnx`` detector).
``onnx``
    Any single-input ONNX edge model from a local file, run with onnxruntime.

Orientation convention (all detectors): ``ContourMap.orientation`` is the angle of the boundary
**normal** (the direction across the boundary, i.e. of the image gradient), in radians in ``[0, pi)``,
measured from the +x axis (columns, to the right) towards the +y axis (rows, *downwards*).  A vertical
boundary (left/right colour change) has orientation 0, a horizontal one pi/2.  This is the convention
of ``pyEdgeEval.nms`` (Dollár's edge NMS) and of higra's oriented watershed (``hg.mean_pb_hierarchy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

__all__ = [
    "ContourMap",
    "CONTOUR_DETECTORS",
    "build_detector",
    "ClassicalDetector",
    "HedDetector",
    "OnnxDetector",
    "LearnedDetector",
    "default_weights",
    "learned_available",
    "lab_input",
    "orientation_from_edges",
]


@dataclass
class ContourMap:
    """Per-pixel boundary map.

    strength: (H, W) float32 in [0, 1], boundary strength (probability-like).
    orientation: (H, W) float32 radians in [0, pi), orientation of the boundary *normal*
        (x = columns to the right, y = rows downwards; 0 = vertical boundary).
    """

    strength: np.ndarray
    orientation: np.ndarray

    def __post_init__(self) -> None:
        self.strength = np.clip(np.asarray(self.strength, dtype=np.float32), 0.0, 1.0)
        self.orientation = np.mod(np.asarray(self.orientation, dtype=np.float32), np.float32(math.pi))
        # float32 mod can return exactly pi for tiny negative inputs
        self.orientation[self.orientation >= np.float32(math.pi)] = 0.0
        if self.strength.shape != self.orientation.shape or self.strength.ndim != 2:
            raise ValueError(
                f"ContourMap: strength {self.strength.shape} and orientation {self.orientation.shape} "
                "must be the same (H, W) shape"
            )


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image


def orientation_from_edges(strength: np.ndarray, radius: int = 4) -> np.ndarray:
    """Approximate normal orientation of a (non-oriented) edge map, as in Dollár's structured edges.

    Smooths the map with a triangle filter of ``radius``, then takes the orientation of the second
    derivatives: ``atan(Oyy * sign(-Oxy) / Oxx) mod pi`` (normal angle, x = columns, y = rows down).
    """
    e = np.asarray(strength, dtype=np.float32)
    if min(e.shape) < 3:
        return np.zeros_like(e)
    k = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float32)
    k /= k.sum()
    e = cv2.sepFilter2D(e, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT)
    gy, gx = np.gradient(e)
    gxy, gxx = np.gradient(gx)
    gyy, _ = np.gradient(gy)
    gxx = np.where(gxx == 0, np.float32(1e-5), gxx)
    return np.mod(np.arctan(gyy * np.sign(-gxy) / gxx), math.pi).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# classical detector
# ----------------------------------------------------------------------------------------------

# Tuned constants.  Obtained by a small grid search on BSDS500 *train* images only (never test):
# 24 train images (every 8th id), 30 thresholds, contour-map ODS F after NMS, scored with a fast
# distance-tolerance proxy of the BSDS matching (maxDist 0.0075 x diagonal, no one-to-one assignment).
# Proxy ODS on that set: L only 0.639; L+a+b (sigmas 1,2,4) 0.691; + texture 0.713; + colour weight
# 1.0 0.718; coarser scale emphasis 0.730; colour = L weight and texture 1.0 0.744; sigmas
# (1.5, 3, 6) with the finest scale at half weight 0.746 (chosen).  The gain does not change the
# contour ranking, only the UCM (mean of the mapped strength along arcs) and where the thresholds
# fall; on 20 of the same train images the UCM proxy ODS was 0.716 (gain 2), 0.725 (gain 1) and
# 0.729 (gain 0.5, chosen: its UCM ODS threshold, 0.26, is also close to HSG's default cut of 0.25);
# without the OWT reweighting it dropped to 0.720.  The texture channel (gradient of the local
# standard deviation of L) was then checked with the real BSDS protocol (one-to-one matching, 5 train
# images, 9 thresholds): with it contour ODS 0.727 / UCM ODS 0.699, without it 0.730 / 0.739 - the
# gradient of an edge-energy map peaks on both sides of a step edge (double responses the proxy
# did not penalise), so it is off by default.  Real figures on test: benchmarks/segments.py.
_DEFAULT_SIGMAS = (1.5, 3.0, 6.0)
# weights per (channel, scale): rows L, a, b, texture; columns the sigmas above
_DEFAULT_WEIGHTS = (
    (0.5, 1.0, 1.0),  # L
    (0.5, 1.0, 1.0),  # a
    (0.5, 1.0, 1.0),  # b
    (0.0, 0.0, 0.0),  # texture (local contrast of L): off, see below
)
_DEFAULT_GAIN = 0.5  # strength = 1 - exp(-gain * energy)
_DEFAULT_N_ORIENT = 8


class ClassicalDetector:
    """Multi-scale oriented colour/brightness/texture gradients in CIE-Lab (no learned weights).

    For each channel c in (L, a, b, T) and scale sigma, the Gaussian-derivative gradient
    ``(gx, gy)`` of the channel smoothed at sigma is scale-normalised (multiplied by
    ``sigma * sqrt(2 pi)`` so a step edge of height h gives h at every scale).  The oriented energy
    at normal angle theta is ``E(theta) = sum_{c,s} w[c,s] * |gx cos(theta) + gy sin(theta)|`` (a
    linear combination per orientation, like Pb's combination of oriented half-disc gradients).
    ``strength = 1 - exp(-gain * max_theta E)``; ``orientation`` is the argmax refined by a parabola
    through the neighbouring orientations.  T is a texture channel: the local standard deviation of
    L at scale ``texture_sigma``.
    Channels are scaled to comparable ranges: L / 100, a / 100, b / 100, T / 20.
    """

    def __init__(
        self,
        sigmas: tuple[float, ...] = _DEFAULT_SIGMAS,
        weights: tuple[tuple[float, ...], ...] = _DEFAULT_WEIGHTS,
        gain: float = _DEFAULT_GAIN,
        n_orient: int = _DEFAULT_N_ORIENT,
        texture_sigma: float = 2.0,
    ) -> None:
        self.sigmas = tuple(float(s) for s in sigmas)
        self.weights = np.asarray(weights, dtype=np.float32)
        if self.weights.shape != (4, len(self.sigmas)):
            raise ValueError(
                f"classical: weights must be 4 rows (L, a, b, texture) x {len(self.sigmas)} scales, "
                f"got shape {self.weights.shape}"
            )
        self.gain = float(gain)
        self.n_orient = int(n_orient)
        if self.n_orient < 2:
            raise ValueError("classical: n_orient must be >= 2")
        self.texture_sigma = float(texture_sigma)

    def channels(self, image: np.ndarray) -> list[np.ndarray]:
        rgb = image.astype(np.float32) * np.float32(1.0 / 255.0)
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
        L = np.ascontiguousarray(lab[:, :, 0]) * np.float32(0.01)
        a = np.ascontiguousarray(lab[:, :, 1]) * np.float32(0.01)
        b = np.ascontiguousarray(lab[:, :, 2]) * np.float32(0.01)
        chans = [L, a, b]
        if np.any(self.weights[3] > 0):
            ts = self.texture_sigma
            m = cv2.GaussianBlur(L, (0, 0), ts, borderType=cv2.BORDER_REFLECT)
            m2 = cv2.GaussianBlur(L * L, (0, 0), ts, borderType=cv2.BORDER_REFLECT)
            chans.append(np.sqrt(np.maximum(m2 - m * m, 0.0)) * np.float32(5.0))
        else:
            chans.append(None)  # type: ignore[arg-type]
        return chans

    def oriented_energy(self, image: np.ndarray) -> np.ndarray:
        """(n_orient, H, W) float32 oriented energy E(theta_k), theta_k = k pi / n_orient."""
        image = _check_image(image)
        H, W = image.shape[:2]
        thetas = np.arange(self.n_orient) * (math.pi / self.n_orient)
        cos_t = np.cos(thetas).astype(np.float32)
        sin_t = np.sin(thetas).astype(np.float32)
        energy = np.zeros((self.n_orient, H, W), dtype=np.float32)
        kx = np.array([-0.5, 0.0, 0.5], dtype=np.float32)
        k1 = np.array([1.0], dtype=np.float32)
        for ci, ch in enumerate(self.channels(image)):
            if ch is None:
                continue
            for si, sigma in enumerate(self.sigmas):
                w = float(self.weights[ci, si])
                if w == 0.0:
                    continue
                sm = cv2.GaussianBlur(ch, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
                norm = np.float32(w * sigma * math.sqrt(2.0 * math.pi))
                gx = cv2.sepFilter2D(sm, cv2.CV_32F, kx, k1, borderType=cv2.BORDER_REFLECT) * norm
                gy = cv2.sepFilter2D(sm, cv2.CV_32F, k1, kx, borderType=cv2.BORDER_REFLECT) * norm
                for k in range(self.n_orient):
                    energy[k] += np.abs(gx * cos_t[k] + gy * sin_t[k])
        return energy

    def __call__(self, image: np.ndarray) -> ContourMap:
        energy = self.oriented_energy(image)
        n = self.n_orient
        kmax = np.argmax(energy, axis=0)
        emax = np.take_along_axis(energy, kmax[None], axis=0)[0]
        # parabolic refinement of the argmax over the circular orientation axis
        em = np.take_along_axis(energy, ((kmax - 1) % n)[None], axis=0)[0]
        ep = np.take_along_axis(energy, ((kmax + 1) % n)[None], axis=0)[0]
        denom = em - 2.0 * emax + ep
        with np.errstate(divide="ignore", invalid="ignore"):
            offset = np.where(denom < -1e-12, 0.5 * (em - ep) / denom, 0.0)
        offset = np.clip(offset, -0.5, 0.5)
        orientation = (kmax + offset) * (math.pi / n)
        strength = 1.0 - np.exp(-self.gain * emax)
        return ContourMap(strength=strength.astype(np.float32), orientation=orientation.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# HED through OpenCV DNN
# ----------------------------------------------------------------------------------------------


class CropLayer:
    """Caffe ``Crop`` layer for cv2.dnn (HED crops its upsampled side outputs to the input size).

    Crops the first input to the spatial size of the second one, with Caffe's ``offset``/``axis=2``
    semantics approximated by a centred crop (what HED's deploy prototxt needs).
    """

    def __init__(self, params: Any, blobs: Any) -> None:
        self.ystart = self.xstart = self.yend = self.xend = 0

    def getMemoryShapes(self, inputs: list) -> list:  # noqa: N802 (cv2 API name)
        input_shape, target_shape = inputs[0], inputs[1]
        batch, channels = input_shape[0], input_shape[1]
        height, width = target_shape[2], target_shape[3]
        self.ystart = (input_shape[2] - height) // 2
        self.xstart = (input_shape[3] - width) // 2
        self.yend = self.ystart + height
        self.xend = self.xstart + width
        return [[batch, channels, height, width]]

    def forward(self, inputs: list) -> list:
        return [inputs[0][:, :, self.ystart : self.yend, self.xstart : self.xend]]


_CROP_REGISTERED = False


def register_crop_layer() -> None:
    """Register :class:`CropLayer` as the ``Crop`` layer of cv2.dnn (idempotent)."""
    global _CROP_REGISTERED
    if not _CROP_REGISTERED:
        try:
            cv2.dnn_unregisterLayer("Crop")
        except Exception:  # pragma: no cover - nothing registered yet
            pass
        cv2.dnn_registerLayer("Crop", CropLayer)
        _CROP_REGISTERED = True


def _require_file(path: str | Path | None, what: str, detector: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{detector} detector: the {what} path is required ({what}=...)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{detector} detector: {what} file not found: {p}")
    return p


class HedDetector:
    """HED from a local Caffe prototxt + caffemodel through cv2.dnn (Crop layer registered here).

    Input preprocessing follows the released HED model: BGR, mean (104.00699, 116.66877, 122.67892),
    no scaling; the fused output (``sigmoid-fuse``) is the edge probability.  Orientation is derived
    from the edge map with :func:`orientation_from_edges`.
    """

    MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

    def __init__(self, prototxt: str | None = None, caffemodel: str | None = None) -> None:
        self.prototxt = _require_file(prototxt, "prototxt", "hed")
        self.caffemodel = _require_file(caffemodel, "caffemodel", "hed")
        read = getattr(cv2.dnn, "readNetFromCaffe", None)
        if read is None:
            raise RuntimeError(
                f"hed detector: this OpenCV ({cv2.__version__}) has no Caffe importer "
                "(cv2.dnn.readNetFromCaffe was removed in OpenCV 5). Install opencv<5 or convert HED to "
                "ONNX and use the 'onnx' detector (path=..., mean=(104.007, 116.669, 122.679), "
                "std=(1, 1, 1), scale=255, bgr=True)."
            )
        register_crop_layer()
        self.net = read(str(self.prototxt), str(self.caffemodel))

    def __call__(self, image: np.ndarray) -> ContourMap:
        image = _check_image(image)
        H, W = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        blob = cv2.dnn.blobFromImage(bgr, scalefactor=1.0, size=(W, H), mean=self.MEAN_BGR, swapRB=False, crop=False)
        self.net.setInput(blob)
        out = np.asarray(self.net.forward(), dtype=np.float32)
        edge = out.reshape(out.shape[-2], out.shape[-1])
        if edge.shape != (H, W):
            edge = cv2.resize(edge, (W, H), interpolation=cv2.INTER_LINEAR)
        return ContourMap(strength=edge, orientation=orientation_from_edges(edge))


# ----------------------------------------------------------------------------------------------
# ONNX edge model
# ----------------------------------------------------------------------------------------------


class OnnxDetector:
    """Any ONNX edge model from a local file, run with onnxruntime (CPU by default).

    Input: one tensor ``(1, 3, H, W)`` float32 built as ``(pixel / scale - mean) / std`` per channel,
    channel order RGB (``bgr=True`` for BGR models).  ``pixel`` is the uint8 value 0..255; e.g.
    ImageNet normalisation is ``scale=255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)``,
    Caffe-style (HED/RCF) is ``scale=1, mean=(104.007, 116.669, 122.679), std=(1, 1, 1), bgr=True``.
    Output: ``output`` selects the model output (index or name, default the last one); it must have
    H x W as its last two dims (resized bilinearly otherwise).  ``apply_sigmoid=True`` for models
    that output logits; values are clipped to [0, 1].  ``multiple`` pads the input (reflect) to a
    multiple of that many pixels for models with strided stages, and the output is cropped back.
    """

    def __init__(
        self,
        path: str | None = None,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        scale: float = 255.0,
        bgr: bool = False,
        output: int | str = -1,
        apply_sigmoid: bool = False,
        multiple: int = 1,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
    ) -> None:
        self.path = _require_file(path, "model", "onnx")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        outs = [o.name for o in self.session.get_outputs()]
        if isinstance(output, int):
            self.output_name = outs[output]
        else:
            if output not in outs:
                raise ValueError(f"onnx detector: output {output!r} not in model outputs {outs}")
            self.output_name = output
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.scale = float(scale)
        self.bgr = bool(bgr)
        self.apply_sigmoid = bool(apply_sigmoid)
        self.multiple = max(1, int(multiple))

    def __call__(self, image: np.ndarray) -> ContourMap:
        image = _check_image(image)
        H, W = image.shape[:2]
        x = image[:, :, ::-1] if self.bgr else image
        ph = (-H) % self.multiple
        pw = (-W) % self.multiple
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(H, W) > 1 else "edge")
        x = x.astype(np.float32).transpose(2, 0, 1) / np.float32(self.scale)
        x = ((x - self.mean) / self.std)[None]
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})[0]
        out = np.asarray(out, dtype=np.float32)
        edge = out.reshape(out.shape[-2], out.shape[-1])
        if ph or pw:
            if edge.shape == (H + ph, W + pw):
                edge = edge[:H, :W]
        if edge.shape != (H, W):
            edge = cv2.resize(edge, (W, H), interpolation=cv2.INTER_LINEAR)
        if self.apply_sigmoid:
            edge = 1.0 / (1.0 + np.exp(-edge))
        return ContourMap(strength=edge, orientation=orientation_from_edges(edge))


# ----------------------------------------------------------------------------------------------
# learned (trained by clips4, shipped as ONNX)
# ----------------------------------------------------------------------------------------------
# The learned contour detector trained by clips4 (``detector: learned``), run with onnxruntime.
# 
# The network (``clips4.trainer.edges.EdgeNet``) is trained by ``clips4 train-contours`` and shipped as
# ``data/contours/edgenet.onnx`` with its model card ``data/contours/MODEL_CARD.md``.  This module needs
# onnxruntime, numpy and OpenCV only (no torch).
# 
# Inference: the image is converted to the network's CIE-Lab input, run at each of ``scales`` (resized
# bilinearly, output resized back) and the fused edge probabilities are averaged (multi-scale inference as
# in HED/RCF/PiDiNet).  The orientation comes from the edge map (:func:`orientation_from_edges`, as in
# Structured Edges); with ``nms=True`` the strength is thinned by the standard edge NMS (Dollár's, as used
# by the BSDS benchmark tools) before it reaches the OWT.

_WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "contours" / "edgenet.onnx"


def default_weights() -> Path:
    """Path of the shipped ONNX weights (may not exist in a checkout without them)."""
    return _WEIGHTS


def learned_available() -> str | None:
    """None when the learned detector can run, else the reason (for the classical fallback message)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    if not _WEIGHTS.is_file():
        return f"the shipped weights {_WEIGHTS} are missing"
    return None


def lab_input(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32: CIE-Lab, L/50 - 1, a/64, b/64 (the training input)."""
    rgb = image.astype(np.float32) * np.float32(1.0 / 255.0)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    lab[:, :, 0] = lab[:, :, 0] * np.float32(1.0 / 50.0) - 1.0
    lab[:, :, 1:] *= np.float32(1.0 / 64.0)
    return np.ascontiguousarray(lab.transpose(2, 0, 1))


def edge_nms(strength: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """Dollár's edge NMS (pyEdgeEval.nms, r=1, s=5, m=1.01): (H, W) float32 thinned strength."""
    from pyEdgeEval import nms

    return np.asarray(nms(strength.astype(np.float64), orientation.astype(np.float64), r=1, s=5, m=1.01),
                      dtype=np.float32)


class LearnedDetector:
    """EdgeNet through onnxruntime.

    Args:
        path: ONNX file (default: the shipped ``data/contours/edgenet.onnx``).
        scales: inference scales whose outputs are averaged (default 0.5, 1, 1.5: +0.014 contour ODS over one
            scale on BSDS val, about 4x the network's single-scale time).
        nms: thin the strength with edge NMS before returning it (the OWT then sees one-pixel contours).
        intra_op_threads: onnxruntime threads (1: the stage parallelises over images).
    """

    def __init__(self, path: str | None = None, scales: tuple[float, ...] = (0.5, 1.0, 1.5), nms: bool = False,
                 intra_op_threads: int = 1) -> None:
        p = Path(path).expanduser() if path else _WEIGHTS
        if not p.is_file():
            raise FileNotFoundError(f"learned detector: weights file not found: {p}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        self.path = p
        self.session = ort.InferenceSession(str(p), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"learned detector: scales must be positive, got {scales}")
        self.nms = bool(nms)

    def edges(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 multi-scale edge probability (before NMS)."""
        image = _check_image(image)
        H, W = image.shape[:2]
        acc = np.zeros((H, W), dtype=np.float32)
        for s in self.scales:
            im = image
            if s != 1.0:
                im = cv2.resize(image, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_LINEAR)
            x = lab_input(im)[None]
            out = self.session.run(None, {self.input_name: x})[0]
            e = np.asarray(out, dtype=np.float32).reshape(out.shape[-2], out.shape[-1])
            if e.shape != (H, W):
                e = cv2.resize(e, (W, H), interpolation=cv2.INTER_LINEAR)
            acc += e
        return acc / np.float32(len(self.scales))

    def __call__(self, image: np.ndarray) -> ContourMap:
        e = self.edges(image)
        theta = orientation_from_edges(e)
        if self.nms:
            e = edge_nms(e, theta)
        return ContourMap(strength=e, orientation=theta)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

Detector = Callable[[np.ndarray], ContourMap]

def build_learned(**params: Any) -> Detector:
    """The shipped learned detector (:class:`LearnedDetector`), or ``classical`` with a message
    when onnxruntime or the shipped weights are missing (an explicit ``path`` that is missing is an error)."""
    reason = learned_available() if not params.get("path") else None
    if reason is not None:
        import warnings

        warnings.warn(f"learned contour detector unavailable ({reason}); using the classical detector", stacklevel=2)
        return ClassicalDetector()
    return LearnedDetector(**params)


CONTOUR_DETECTORS: dict[str, Callable[..., Detector]] = {
    "learned": build_learned,
    "classical": ClassicalDetector,
    "hed": HedDetector,
    "onnx": OnnxDetector,
}


def build_detector(name: str = "classical", **params: Any) -> Detector:
    """Build a contour detector by registry name with keyword parameters.

    Raises ValueError listing the valid names for an unknown name.
    """
    try:
        builder = CONTOUR_DETECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown contour detector {name!r}; valid names: {', '.join(sorted(CONTOUR_DETECTORS))}"
        ) from None
    return builder(**params)
