import json

import numpy as np
from PIL import Image

from clips4.evaluate.metrics import ConfusionMatrix
from clips4.cli import main
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
    assert main(["report", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--out", str(out)]) == 0
    assert out.read_text().strip() == table


def test_project_2d_pca():
    X = np.zeros((10, 4))
    X[:, 2] = np.arange(10)
    P = project_2d(X)
    assert P.shape == (10, 2) and np.ptp(np.abs(P[:, 0])) > 0


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    bb, fb = artist.get_window_extent(), fig.bbox
    return bb.x0 >= fb.x0 - 1 and bb.x1 <= fb.x1 + 1 and bb.y0 >= fb.y0 - 1 and bb.y1 <= fb.y1 + 1


def test_per_class_title_stays_inside_the_figure():
    from clips4.evaluate.report import per_class_figure

    title = "language-driven segmentation — student (checkpoint runs/voc-resnet50/ckpt_020000.pt) on voc-val: per-class IoU"
    fig = per_class_figure(["bg", "cat", "dog"], [0.5, None, 0.25], title)
    assert _inside(fig, fig.axes[0].title)
    assert fig.axes[0].title.get_text().replace("\n", " ") == title  # wrapped, not cut


def test_report_overlays_carry_their_image_id(tmp_path, monkeypatch):
    import clips4.evaluate.report as report

    seen, real = [], report.overlay_figure
    monkeypatch.setattr(report, "overlay_figure", lambda *a, **k: seen.append(k.get("image_id")) or real(*a, **k))
    img = np.zeros((8, 10, 3), np.uint8)
    lab = np.zeros((8, 10), np.int64)
    res, _ = _results()
    write_report(tmp_path, res, title="t", class_names=["bg"], overlays=[(img, lab, lab, "2007_000033"), (img, lab, lab)])
    assert seen == ["2007_000033", None]


def test_overlay_figure_blends_and_has_a_legend_of_present_classes():
    from clips4.evaluate.palette import VOID_COLOUR, figure_palette
    from clips4.evaluate.report import overlay_figure

    img = np.full((20, 30, 3), 200, np.uint8)
    pred = np.zeros((20, 30), np.int64)
    pred[:, 10:] = 2  # dog 400 px, background 200, cat (in gt) 300
    gt = np.full((20, 30), 255)
    gt[:10] = 1
    fig = overlay_figure(img, pred, gt, ["background", "cat", "dog", "cow"], image_id="2007_000033")
    (legend,) = fig.legends
    # by area, cow absent; the ground truth's not-scored pixels last
    assert [t.get_text() for t in legend.get_texts()] == ["dog", "cat", "background", "void (not scored)"]
    assert _inside(fig, legend)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "2007_000033"  # which image this is
    shown = fig.axes[1].images[0].get_array()
    # the prediction panel is the image tinted with the class colour, not the bare colour
    np.testing.assert_allclose(shown[0, 20], 0.45 * 200 + 0.55 * figure_palette()[2], atol=1)
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array()[15, 5], VOID_COLOUR)  # void drawn, as its legend
    gt_all = np.ones((20, 30), np.int64)  # no void pixel: no void entry
    fig = overlay_figure(img, pred, gt_all, ["background", "cat", "dog", "cow"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cat", "dog", "background"]


def test_confusion_values_for_few_classes_top_list_for_many(tmp_path):
    from clips4.evaluate.report import CONFUSION_VALUES_MAX, confusion_figure, top_confusions

    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 1, 1, 1, 0, 2, 2]), np.array([0, 0, 0, 1, 1, 1, 1, 2, 2]))  # (pred, gt)
    fig = confusion_figure(cm, ["bg", "cat", "dog"])
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"67", "33", "100", "75", "25"} <= texts  # row-normalised percentages in the cells
    assert _inside(fig, fig.axes[0].yaxis.label) and _inside(fig, fig.axes[0].title)
    top = top_confusions(cm, ["bg", "cat", "dog"])
    assert [(t["gt"], t["pred"]) for t in top] == [("bg", "cat"), ("cat", "bg")]
    assert abs(top[0]["fraction"] - 1 / 3) < 1e-9 and top[1]["pixels"] == 1

    n = CONFUSION_VALUES_MAX + 5
    big = ConfusionMatrix(n)
    g = np.arange(n).repeat(10)
    p = g.copy()
    p[::10] = (g[::10] + 1) % n  # every class loses a tenth to the next one
    big.update(p, g)
    names = [f"c{i}" for i in range(n)]
    fig = confusion_figure(big, names, top_n=7)
    assert not fig.axes[0].texts and len(fig.axes) == 3  # matrix, top list, colour bar
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()][-1] == "c0 \u2192 c1"
    paths = write_report(tmp_path, big.to_dict(names), title="many", class_names=names, confusion=big)
    assert "## Largest confusions" in paths["markdown"].read_text() and "| c0 | c1 | 10.0 |" in paths["markdown"].read_text()
