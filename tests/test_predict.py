import json

import numpy as np
from PIL import Image

from clips4.evaluate.palette import DISTINCT_COLOURS, VOID_COLOUR, figure_palette, voc_palette
from clips4.evaluate.predict import LEGEND_WIDTH, TITLE_HEIGHT, render_prediction


def _lab(rgb) -> np.ndarray:
    """sRGB (0..255) -> CIELAB (D65), for colour distances."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _closest_pair(colours) -> float:
    lab = _lab(colours)
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float(d.min())


def test_the_figure_palette_has_no_near_identical_colours():
    assert _closest_pair(voc_palette()[:21]) < 10  # the VOC map: bus / motorbike at 8.8
    assert _closest_pair(figure_palette()[:21]) >= 30 and _closest_pair(DISTINCT_COLOURS) >= 25
    # none is close to the void colour or to the legend's white
    for other in (VOID_COLOUR, (255, 255, 255)):
        assert _closest_pair(np.vstack([DISTINCT_COLOURS, [other]])) >= 25
    assert tuple(figure_palette()[255]) == VOID_COLOUR


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
    assert ov.shape[1] == 60 + LEGEND_WIDTH and ov.shape[0] >= 40 + TITLE_HEIGHT
    assert np.any(ov[:TITLE_HEIGHT, :60] < 128)  # the title line names the image
    pal = figure_palette()
    legend = ov[:, 60:].reshape(-1, 3)
    for cid in (0, 2):  # swatches of the classes present
        assert np.any(np.all(legend == pal[cid], axis=1))
    assert not np.any(np.all(legend == pal[1], axis=1))  # aeroplane absent -> no swatch
    areas = json.loads(out["areas_json"].read_text())["classes"]
    assert set(areas) == {"background", "bicycle", "<ignore>"}
    assert areas["bicycle"]["pixels"] == 1200 and abs(areas["bicycle"]["fraction"] - 0.5) < 1e-9
    assert areas["background"]["pixels"] == 1200 - 25
    assert out["legend_colors"]["bicycle"] == pal[2].tolist()
