"""The learned contour detector: training command end to end on a synthetic BSDS-layout folder, ONNX export,
the onnxruntime detector in the segments computation, and the classical fallback."""
import json
import warnings

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _make_bsds(root, split="train", n=3, h=72, w=96, seed=0):
    """Random axis-aligned rectangles on a flat background; two annotators (one also marks a fake edge)."""
    import scipy.io as sio

    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "groundTruth" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        seg = np.ones((h, w), np.uint16)
        img = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
        for k in range(2, 5):
            y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
            y1, x1 = y0 + rng.integers(10, 20), x0 + rng.integers(10, 20)
            seg[y0:y1, x0:x1] = k
            img[y0:y1, x0:x1] = rng.integers(0, 255, 3)
        b = np.zeros((h, w), np.uint8)
        b[:, :-1] |= (seg[:, :-1] != seg[:, 1:]).astype(np.uint8)
        b[:-1, :] |= (seg[:-1, :] != seg[1:, :]).astype(np.uint8)
        b2 = b.copy()
        b2[h // 2, :] = 1  # a minority annotation: ignored by the consensus loss, never an edge
        gt = np.empty((1, 2), dtype=object)
        gt[0, 0] = {"Segmentation": seg, "Boundaries": b}
        gt[0, 1] = {"Segmentation": seg, "Boundaries": b2}
        cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 98])
        sio.savemat(str(root / "groundTruth" / split / f"{i}.mat"), {"groundTruth": gt})
    return root


def test_train_contours_end_to_end_loss_decreases_and_resumes(tmp_path):
    from clips4.cli import main

    root = _make_bsds(tmp_path / "bsds")
    out = tmp_path / "run"
    args = ["train-contours", "--root", str(root), "--out", str(out), "--batch", "4", "--crop", "48",
            "--checkpoint-every", "10", "--lr", "0.003", "--seed", "3"]
    assert main(args + ["--iterations", "40"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [20, 40]
    # the logged batch losses are too noisy for 40 iterations: compare the loss on all training images of the
    # initial model (same seed) and of the trained one
    import torch

    from clips4.pipeline.contours import lab_input
    from clips4.trainer.edges import balanced_bce, build_edge_net, load_bsds_split, load_edge_net

    _, ims, labs = load_bsds_split(root, "train")
    x = torch.from_numpy(np.stack([lab_input(im) for im in ims]))
    y = torch.from_numpy(np.stack([lab[None] / 255.0 for lab in labs])).float()
    torch.manual_seed(3)
    with torch.no_grad():
        before = float(balanced_bce(build_edge_net(8).eval()(x), y, 0.3, 1.1))
        after = float(balanced_bce(load_edge_net(out / "edges.pt")(x), y, 0.3, 1.1))
    assert after < 0.99 * before
    assert (out / "edges.onnx").stat().st_size > 10_000
    assert list((out / "cache").glob("labels-train-*.npz"))  # label preparation cached

    params = json.loads((out / "params.json").read_text())  # the resolved parameters beside the weights
    assert params["seed"] == 3 and params["iterations"] == 40 and params["parameters"] > 10_000

    # shipping: the run's ONNX bytes are copied and the card names its sha256, data and hardware
    import hashlib

    from clips4.trainer.edges import ship_weights

    card = ship_weights(out, tmp_path / "ship", command="clips4 train-contours ...", figures={"val": {}},
                        hardware="a test")
    shipped = tmp_path / "ship" / "edgenet.onnx"
    assert shipped.read_bytes() == (out / "edges.onnx").read_bytes()
    assert card["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert card["training"]["batch"] == 4 and "a test" in (tmp_path / "ship" / "MODEL_CARD.md").read_text()

    # resumable: a longer run continues from the checkpoint (iteration 40) instead of starting over
    assert main(args + ["--iterations", "60"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [20, 40, 60]


def test_crop_batches_are_the_same_for_any_number_of_loader_workers(tmp_path):
    import torch

    from clips4.trainer.edges import CropBatches, EdgeTrainParams, batches, load_bsds_split

    root = _make_bsds(tmp_path / "bsds", n=2)
    _, ims, labs = load_bsds_split(root, "train")
    data = CropBatches(ims, labs, EdgeTrainParams(root=str(root), batch=3, crop=32, seed=5))
    inline = list(batches(data, 4, 8, 0))
    pooled = list(batches(data, 4, 8, 2))
    assert len(inline) == len(pooled) == 4
    assert inline[0][0].shape == (3, 3, 32, 32) and inline[0][1].shape == (3, 1, 32, 32)
    for (x0, y0), (x1, y1) in zip(inline, pooled):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(inline[0][0], inline[1][0])  # each iteration draws its own batch


def test_train_contours_bad_value_and_locked_folder(tmp_path, capsys):
    from clips4.cli import main
    from clips4.pipeline.lock import StageLock

    root = _make_bsds(tmp_path / "bsds", n=1)
    out = tmp_path / "run"
    args = ["train-contours", "--root", str(root), "--out", str(out), "--iterations", "2", "--batch", "2", "--crop", "32"]
    assert main(args + ["--workers", "-1"]) == 2
    assert "workers must be >= 0, got -1" in capsys.readouterr().err
    with StageLock(str(out)):  # another run holds the folder: exit 3, nothing written
        assert main(args) == 3
    assert "being written by" in capsys.readouterr().err
    assert not (out / "log.jsonl").exists()
    assert main(args) == 0 and (out / "edges.onnx").is_file()  # free again


def test_train_contours_init_fine_tunes_from_weights(tmp_path, capsys):
    import torch

    from clips4.cli import main

    root = _make_bsds(tmp_path / "bsds", n=1)
    base = ["train-contours", "--root", str(root), "--iterations", "2", "--batch", "2", "--crop", "32"]
    assert main(base + ["--out", str(tmp_path / "a"), "--seed", "1"]) == 0
    init = tmp_path / "a" / "edges.pt"
    # a near-zero learning rate: the fine-tuned weights are the initial ones (a random start would differ)
    assert main(base + ["--out", str(tmp_path / "b"), "--seed", "2", "--lr", "1e-12", "--init", str(init)]) == 0
    a = torch.load(init, weights_only=True)
    b = torch.load(tmp_path / "b" / "edges.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert json.loads((tmp_path / "b" / "params.json").read_text())["init"] == str(init)
    # weights of another width, or not weights at all: exit 2 naming the file, nothing trained
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "c"), "--width", "12", "--init", str(init)]) == 2
    assert "edges.pt is not EdgeNet weights of width 12" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(base + ["--out", str(tmp_path / "d"), "--init", str(junk)]) == 2
    assert "junk.pt is not EdgeNet weights" in capsys.readouterr().err
    assert not (tmp_path / "d" / "edges.pt").exists()


def test_train_contours_bad_root_names_folder(tmp_path, capsys):
    from clips4.cli import main

    assert main(["train-contours", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_onnx_detector_matches_torch_and_runs_in_segments(tmp_path):
    import torch

    from clips4.pipeline.contours import build_detector
    from clips4.pipeline.contours import LearnedDetector
    from clips4.pipeline.segments import compute_segments
    from clips4.trainer.edges import build_edge_net, export_onnx, predict_edges

    torch.manual_seed(0)
    model = build_edge_net(8).eval()
    onnx_path = export_onnx(model, tmp_path / "e.onnx")
    img = cv2.imread(str(_make_bsds(tmp_path / "b", n=1) / "images" / "train" / "0.jpg"))[:, :, ::-1].copy()
    det = build_detector("learned", path=str(onnx_path), scales=(1.0,))
    assert isinstance(det, LearnedDetector)
    assert build_detector("learned", path=str(onnx_path)).scales == (0.5, 1.0, 1.5)  # the default: three scales
    cm = det(img)
    assert cm.strength.shape == img.shape[:2]
    np.testing.assert_allclose(cm.strength, predict_edges(model, img), atol=1e-4)
    # multi-scale and NMS: still one (H, W) map in [0, 1]; NMS only removes strength
    cm2 = LearnedDetector(path=str(onnx_path), scales=(0.5, 1.0), nms=True)(img)
    assert cm2.strength.shape == img.shape[:2] and 0 <= cm2.strength.min() and cm2.strength.max() <= 1
    arrays = compute_segments(img, det)
    assert arrays["ucm"].shape == img.shape[:2] + (2,) and arrays["labels"].max() >= 0


def test_learned_falls_back_to_classical_with_message(monkeypatch):
    import clips4.pipeline.contours as lc
    from clips4.pipeline.contours import ClassicalDetector, build_detector

    monkeypatch.setattr(lc, "learned_available", lambda: "onnxruntime is not installed")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        det = build_detector("learned")
    assert isinstance(det, ClassicalDetector)
    assert any("onnxruntime is not installed" in str(x.message) for x in w)


def test_learned_explicit_missing_path_is_an_error(tmp_path):
    from clips4.pipeline.contours import build_detector

    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_detector("learned", path=str(tmp_path / "missing.onnx"))


def test_shipped_weights_match_their_model_card():
    import hashlib

    from clips4.pipeline.contours import build_detector
    from clips4.pipeline.contours import LearnedDetector, default_weights

    path = default_weights()
    card = json.loads(path.with_name("edgenet.json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
    det = build_detector("learned")
    assert isinstance(det, LearnedDetector)
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 220  # one vertical step edge: strongest response on the step columns
    s = det(img).strength
    assert s[:, 28:32].mean() > 2 * s[:, :20].mean()
