"""The learned contour detector trained by clips4 (``detector: learned``), run with onnxruntime.

The network (``clips4.trainer.edges.EdgeNet``) is trained by ``clips4 train-contours`` and shipped as
``data/contours/edgenet.onnx`` with its model card ``data/contours/MODEL_CARD.md``.  This module needs
onnxruntime, numpy and OpenCV only (no torch).

Inference: the image is converted to the network's CIE-Lab input, run at each of ``scales`` (resized
bilinearly, output resized back) and the fused edge probabilities are averaged (multi-scale inference as
in HED/RCF/PiDiNet).  The orientation comes from the edge map (:func:`orientation_from_edges`, as in
Structured Edges); with ``nms=True`` the strength is thinned by the standard edge NMS (Dollár's, as used
by the BSDS benchmark tools) before it reaches the OWT.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from clips4.pipeline.contours import ContourMap, _check_image, orientation_from_edges

__all__ = ["LearnedDetector", "default_weights", "learned_available", "lab_input"]

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
        scales: inference scales whose outputs are averaged.
        nms: thin the strength with edge NMS before returning it (the OWT then sees one-pixel contours).
        intra_op_threads: onnxruntime threads (1: the stage parallelises over images).
    """

    def __init__(self, path: str | None = None, scales: tuple[float, ...] = (1.0,), nms: bool = False,
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
