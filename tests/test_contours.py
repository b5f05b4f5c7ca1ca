import math

import numpy as np
import pytest

from clips4.pipeline.contours import (
    CONTOUR_DETECTORS,
    ContourMap,
    CropLayer,
    build_detector,
)


def _halves(vertical: bool = True, h: int = 60, w: int = 100) -> np.ndarray:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    if vertical:
        img[:, : w // 2] = (200, 30, 30)
        img[:, w // 2 :] = (30, 60, 200)
    else:
        img[: h // 2] = (200, 30, 30)
        img[h // 2 :] = (30, 60, 200)
    return img


def _angle_diff(a, b):
    d = np.abs(np.mod(a - b, math.pi))
    return np.minimum(d, math.pi - d)


def test_registry_and_unknown_name():
    assert {"classical", "hed", "onnx"} <= set(CONTOUR_DETECTORS)
    with pytest.raises(ValueError) as e:
        build_detector("nope")
    for name in ("classical", "hed", "onnx"):
        assert name in str(e.value)


def test_classical_vertical_seam():
    img = _halves(vertical=True)
    cm = build_detector("classical")(img)
    assert isinstance(cm, ContourMap)
    assert cm.strength.shape == (60, 100) and cm.strength.dtype == np.float32
    assert cm.orientation.dtype == np.float32
    assert cm.strength.min() >= 0 and cm.strength.max() <= 1
    assert cm.orientation.min() >= 0 and cm.orientation.max() < math.pi
    rows = slice(20, 40)
    col_profile = cm.strength[rows].mean(axis=0)
    assert abs(int(np.argmax(col_profile)) - 49.5) <= 1.0
    assert col_profile[49:51].min() > 0.5
    assert col_profile[:20].max() < 0.05 and col_profile[80:].max() < 0.05
    assert np.all(np.diff(col_profile[20:50]) >= -1e-6) and np.all(np.diff(col_profile[50:80]) <= 1e-6)
    # vertical boundary -> normal along x -> orientation 0 (mod pi)
    assert _angle_diff(cm.orientation[rows, 49:51], 0.0).max() < 0.1


def test_classical_horizontal_seam_orientation():
    cm = build_detector("classical")(_halves(vertical=False))
    cols = slice(30, 70)
    row_profile = cm.strength[:, cols].mean(axis=1)
    assert abs(int(np.argmax(row_profile)) - 29.5) <= 1.0
    assert _angle_diff(cm.orientation[29:31, cols], math.pi / 2).max() < 0.1


def test_classical_diagonal_orientation():
    h = w = 64
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.where((xx + yy < 64)[..., None], np.uint8(220), np.uint8(20)).repeat(3, axis=2).astype(np.uint8)
    cm = build_detector("classical")(img)
    on = (np.abs(xx + yy - 63.5) < 1) & (xx > 15) & (xx < 48)
    # boundary x + y = c has normal (1, 1)/sqrt2 -> pi/4 with y pointing down
    assert np.median(_angle_diff(cm.orientation[on], math.pi / 4)) < 0.1


def test_classical_flat_and_tiny_images():
    det = build_detector("classical")
    flat = np.full((20, 30, 3), 128, np.uint8)
    assert det(flat).strength.max() < 1e-3
    for shape in ((1, 1, 3), (2, 2, 3), (1, 7, 3)):
        cm = det(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))
        assert cm.strength.shape == shape[:2]


def test_classical_bad_params():
    with pytest.raises(ValueError):
        build_detector("classical", weights=((1, 1),))
    with pytest.raises(ValueError):
        build_detector("classical")(np.zeros((4, 4, 3), np.float32))


def test_hed_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="prototxt"):
        build_detector("hed", prototxt=str(tmp_path / "deploy.prototxt"), caffemodel=str(tmp_path / "hed.caffemodel"))
    proto = tmp_path / "deploy.prototxt"
    proto.write_text("name: 'x'\n")
    with pytest.raises(FileNotFoundError, match="caffemodel"):
        build_detector("hed", prototxt=str(proto), caffemodel=str(tmp_path / "hed.caffemodel"))
    with pytest.raises(ValueError, match="required"):
        build_detector("hed")


def test_crop_layer_centre_crop():
    layer = CropLayer(None, None)
    shapes = layer.getMemoryShapes([[1, 1, 10, 12], [1, 3, 6, 8]])
    assert shapes == [[1, 1, 6, 8]]
    x = np.arange(120, dtype=np.float32).reshape(1, 1, 10, 12)
    (y,) = layer.forward([x, np.zeros((1, 3, 6, 8), np.float32)])
    assert y.shape == (1, 1, 6, 8)
    assert np.array_equal(y, x[:, :, 2:8, 2:10])


def _tiny_edge_model(path):
    """A single 3x3 conv (horizontal gradient of the channel mean) + abs, built with onnx.helper."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    k = np.zeros((1, 3, 3, 3), dtype=np.float32)
    k[0, :, 1, 0] = -1.0 / 3
    k[0, :, 1, 2] = 1.0 / 3
    w = numpy_helper.from_array(k, name="W")
    conv = helper.make_node("Conv", ["input", "W"], ["g"], pads=[1, 1, 1, 1])
    absn = helper.make_node("Abs", ["g"], ["edges"])
    graph = helper.make_graph(
        [conv, absn],
        "tiny_edges",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("edges", TensorProto.FLOAT, [1, 1, None, None])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_onnx_detector(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "edges.onnx"
    _tiny_edge_model(path)
    img = np.zeros((24, 32, 3), np.uint8)
    img[:, 16:] = 255
    det = build_detector("onnx", path=str(path), scale=255.0)
    cm = det(img)
    assert cm.strength.shape == (24, 32)
    prof = cm.strength[5:19].mean(axis=0)
    # (the zero padding of the conv makes a spurious edge on the bright right border: ignore it)
    assert set((np.flatnonzero(prof[1:31] > 0.3) + 1).tolist()) <= {15, 16}
    assert prof[15] > 0.3 and prof[16] > 0.3
    assert prof[:10].max() < 1e-6
    # mean/std normalisation: (x/255 - 0.5)/0.5 doubles the step -> clipped at 1
    cm2 = build_detector("onnx", path=str(path), scale=255.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img)
    assert cm2.strength[10, 16] > cm.strength[10, 16] - 1e-6
    # the padding path for strided models crops back to the input size
    cm3 = build_detector("onnx", path=str(path), multiple=16)(img[:20, :30])
    assert cm3.strength.shape == (20, 30)


def test_onnx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        build_detector("onnx", path=str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match="required"):
        build_detector("onnx")


def test_hed_path_runs_a_tiny_caffe_net_built_here(tmp_path):
    """The real cv2.dnn Caffe path, including the Crop layer HED needs, on a weightless net written by the test.
    (An empty .caffemodel is a valid empty NetParameter: the layers below have no weights.)"""
    import cv2

    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("this OpenCV has no Caffe reader (OpenCV 5); clips4 pins opencv<5")
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(
        'name: "tiny-hed"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 32 dim: 32 }\n'
        'layer { name: "slice" type: "Slice" bottom: "data" top: "c0" top: "c12" slice_param { axis: 1 slice_point: 1 } }\n'
        'layer { name: "scale" type: "Power" bottom: "c0" top: "s" power_param { scale: 0.01 } }\n'
        'layer { name: "crop" type: "Crop" bottom: "s" bottom: "data" top: "cropped" }\n'
        'layer { name: "sigmoid-fuse" type: "Sigmoid" bottom: "cropped" top: "sigmoid-fuse" }\n'
    )
    model = tmp_path / "tiny.caffemodel"
    model.write_bytes(b"")
    det = build_detector("hed", prototxt=str(proto), caffemodel=str(model))
    img = np.zeros((40, 50, 3), np.uint8)
    img[:, 25:] = 255
    cm = det(img)
    assert cm.strength.shape == (40, 50) and cm.orientation.shape == (40, 50)
    # sigmoid(0.01 * (B - mean_B)): the bright half responds more than the dark half
    assert cm.strength[:, 30:].mean() > cm.strength[:, :20].mean()
