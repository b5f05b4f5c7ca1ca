"""Odd and broken image files: converted to RGB or refused with a message naming the file."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clips4.pipeline.images import ImageError, load_rgb


def _save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return str(p)


@pytest.mark.parametrize(
    "name,make,expect",
    [
        ("gray.png", lambda: Image.fromarray(np.full((5, 7), 100, np.uint8)), (100, 100, 100)),
        ("rgba.png", lambda: Image.fromarray(np.dstack([np.full((5, 7, 3), 0, np.uint8), np.full((5, 7), 0, np.uint8)]), "RGBA"), (255, 255, 255)),
        ("pal.png", lambda: Image.fromarray(np.full((5, 7), 1, np.uint8)).convert("P"), (1, 1, 1)),
        ("g16.png", lambda: Image.fromarray(np.full((5, 7), 65535, np.uint16)), (255, 255, 255)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (7, 5), (0, 0, 0, 0)), (255, 255, 255)),
        ("one.png", lambda: Image.new("RGB", (1, 1), (9, 8, 7)), (9, 8, 7)),
    ],
)
def test_modes_convert_to_rgb(tmp_path, name, make, expect):
    arr = load_rgb(_save(tmp_path, name, make()))
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert np.abs(arr[0, 0].astype(int) - np.array(expect)).max() <= 2


def test_broken_files_name_the_file(tmp_path):
    good = _save(tmp_path, "ok.jpg", Image.new("RGB", (64, 64), (10, 20, 30)))
    data = open(good, "rb").read()
    cases = {
        "trunc.jpg": data[: len(data) // 2],
        "garbage.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "text.png": b"hello",
        "empty.png": b"",
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ImageError, match=name):
            load_rgb(str(tmp_path / name))
    with pytest.raises(ImageError, match="not found"):
        load_rgb(str(tmp_path / "missing.png"))


def test_too_large_is_refused_from_the_header(tmp_path):
    p = _save(tmp_path, "big.png", Image.new("L", (4000, 3000)))
    with pytest.raises(ImageError, match="max_pixels"):
        load_rgb(p, max_pixels=1_000_000)
