import json

import numpy as np
from PIL import Image

from clips4.evaluate.metrics import ConfusionMatrix
from clips4.cli.report import report as report_command
from clips4.evaluate.report import markdown_table, project_2d, side_by_side, write_report


def _results():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [2, 1]]))
    res = cm.to_dict(["bg", "cat", "dog"])
    res["method"] = "CLIP-S4"
    return res, cm


def test_write_report_files_and_table(tmp_path):
    res, cm = _results()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
    lab = rng.integers(0, 3, (8, 10))
    emb = {"CLIP": (rng.normal(size=(30, 5)), np.repeat([0, 1, 2], 10)),
           "model": (rng.normal(size=(30, 5)), np.repeat([0, 1, 2], 10))}
    paths = write_report(tmp_path, res, title="VOC language", class_names=["bg", "cat", "dog"], confusion=cm,
                         overlays=[(img, lab, lab)], embeddings=emb, config={"k": 1}, fingerprints={"ckpt": "abc"})
    for key in ("json", "markdown", "per_class_iou", "confusion", "overlay_0", "embeddings"):
        assert paths[key].is_file(), key
    for key in ("per_class_iou", "confusion", "overlay_0", "embeddings"):
        with Image.open(paths[key]) as im:
            assert im.size[0] > 100
    data = json.loads(paths["json"].read_text())
    assert data["fingerprints"] == {"ckpt": "abc"} and data["config"] == {"k": 1}
    assert abs(data["miou"] - res["miou"]) < 1e-12 and len(data["confusion_matrix"]) == 3
    md = paths["markdown"].read_text()
    # paper layout: method row x mIoU column, percent with one decimal
    assert "| Method | mIoU | pAcc | mAcc |" in md
    assert f"| CLIP-S4 | {100 * res['miou']:.1f} |" in md


def test_markdown_rows_and_side_by_side(tmp_path):
    t = markdown_table([{"Method": "MaskCLIP", "miou": 0.252}, {"Method": "CLIP-S4", "miou": 0.336, "hiou": None}])
    assert "| MaskCLIP | 25.2 | - |" in t and "| CLIP-S4 | 33.6 | - |" in t
    res, _ = _results()
    write_report(tmp_path / "run_a", res, title="a")
    (tmp_path / "run_b").mkdir()
    (tmp_path / "run_b" / "davis_results.json").write_text(
        json.dumps({"global": {"J-Mean": 0.5, "F-Mean": 0.6, "J&F-Mean": 0.55}}))
    table = side_by_side([tmp_path / "run_a", tmp_path / "run_b"])
    lines = table.splitlines()
    assert lines[0].startswith("| Method | mIoU") and "J&F (Mean)" in lines[0]
    assert "CLIP-S4 (run_a)" in table and "| run_b |" in table and "55.0" in table
    out = tmp_path / "cmp.md"
    report_command([tmp_path / "run_a", tmp_path / "run_b"], out)
    assert out.read_text().strip() == table


def test_project_2d_pca():
    X = np.zeros((10, 4))
    X[:, 2] = np.arange(10)
    P = project_2d(X)
    assert P.shape == (10, 2) and np.ptp(np.abs(P[:, 0])) > 0
