import json

import numpy as np
from PIL import Image

from clips4.evaluate.palette import voc_palette
from clips4.evaluate.predict import LEGEND_WIDTH, render_prediction


def test_render_prediction(tmp_path):
    img = np.full((40, 60, 3), 200, np.uint8)
    lab = np.zeros((40, 60), np.int64)
    lab[:, 30:] = 2
    lab[:5, :5] = 255
    out = render_prediction(img, lab, ["background", "aeroplane", "bicycle"], tmp_path, "x")
    with Image.open(out["labels"]) as im:
        assert im.mode == "P" and im.size == (60, 40)
        assert np.array_equal(np.array(im), lab)
    with Image.open(out["overlay"]) as im:
        ov = np.array(im.convert("RGB"))
    assert ov.shape[1] == 60 + LEGEND_WIDTH and ov.shape[0] >= 40
    pal = voc_palette()
    legend = ov[:, 60:].reshape(-1, 3)
    for cid in (0, 2):  # swatches of the classes present
        if cid == 0:
            continue  # black swatch is indistinguishable from text; checked via JSON below
        assert np.any(np.all(legend == pal[cid], axis=1))
    assert not np.any(np.all(legend == pal[1], axis=1))  # aeroplane absent -> no swatch
    areas = json.loads(out["areas_json"].read_text())["classes"]
    assert set(areas) == {"background", "bicycle", "<ignore>"}
    assert areas["bicycle"]["pixels"] == 1200 and abs(areas["bicycle"]["fraction"] - 0.5) < 1e-9
    assert areas["background"]["pixels"] == 1200 - 25
    assert out["legend_colors"]["bicycle"] == pal[2].tolist()
