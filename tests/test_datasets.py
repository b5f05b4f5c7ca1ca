"""Dataset readers on tiny layouts built here, and on ../shared/data where present."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clips4.pipeline.datasets import DatasetError, open_dataset


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def test_folder_recursive_with_masks_and_classes(tmp_path):
    _png(tmp_path / "images" / "val" / "a" / "x.png", np.zeros((4, 5, 3), np.uint8))
    _png(tmp_path / "images" / "val" / "y.jpg", np.zeros((6, 7, 3), np.uint8))
    _png(tmp_path / "masks" / "val" / "a" / "x.png", np.ones((4, 5), np.uint8))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    ds = open_dataset("folder", str(tmp_path), "val")
    recs = ds.records()
    assert [r.image_id for r in recs] == ["a/x", "y"]
    assert (recs[0].height, recs[0].width) == (4, 5) and recs[0].gt_path and recs[1].gt_path is None
    assert ds.class_names == ["cat", "dog"] and ds.load_gt(recs[0]).max() == 1
    assert ds.key == open_dataset("folder", str(tmp_path / "images" / ".." ), "val").key


def test_unknown_kind_and_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="valid kinds: bsds, cocostuff, context, davis, folder, voc"):
        open_dataset("kitti", str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset("voc", str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="split file"):
        open_dataset("voc", str(tmp_path), "train").records()


def test_cocostuff_maps_182_ids_to_171(tmp_path):
    _png(tmp_path / "images" / "val2017" / "1.jpg", np.zeros((2, 3, 3), np.uint8))
    _png(tmp_path / "annotations" / "val2017" / "1.png", np.array([[0, 11, 12], [181, 255, 91]], np.uint8))
    ds = open_dataset("cocostuff", str(tmp_path))
    gt = ds.load_gt(ds.records()[0])
    assert gt.tolist() == [[0, 255, 11], [170, 255, 80]] and len(ds.class_names) == 171


def test_real_layouts(shared_data):
    voc = open_dataset("voc", str(shared_data / "VOC2012"))
    assert len(voc.records()) == 40 and len(voc.class_names) == 21
    ctx = open_dataset("context", str(shared_data / "PascalContext"))
    gt = ctx.load_gt(ctx.records()[0])
    assert len(ctx.class_names) == 59 and gt.max() <= 58 or gt.max() == 255
    dav = open_dataset("davis", str(shared_data / "DAVIS"))
    assert dav.sequences() == ["blackswan", "car-shadow"] and len(dav.records()) == 50
    bsds = open_dataset("bsds", str(shared_data / "BSDS500"))
    anns = bsds.load_bsds_gt(bsds.records()[0])
    assert len(anns) in (5, 6) and anns[0]["boundaries"].dtype == bool
