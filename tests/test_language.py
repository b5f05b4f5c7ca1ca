import numpy as np
import pytest
from PIL import Image

from clips4.evaluate.language import (
    evaluate_language,
    predict_labels,
    voc_gt_transform,
    voc_text_subset,
)
from clips4.trainer.inference import similarity_logits, sliding_window_embed


def _text():
    return np.eye(3, 4, dtype=np.float32)  # 3 classes along the first three axes of a 4-D space


def test_predict_labels_layouts_and_cosine():
    t = _text()
    emb = np.zeros((2, 3, 4), np.float32)
    emb[0, :, 1] = 5.0  # row 0 -> class 1 (magnitude irrelevant: cosine)
    emb[1, :, 2] = 0.1
    emb[1, 0, 0] = 0.2  # -> class 0
    hwd = predict_labels(emb, t)
    assert hwd.dtype == np.int64 and hwd.tolist() == [[1, 1, 1], [0, 2, 2]]
    dhw = predict_labels(emb.transpose(2, 0, 1), t)
    assert np.array_equal(hwd, dhw)
    with pytest.raises(ValueError):
        predict_labels(np.zeros((2, 3, 5)), t)


def test_logit_upsampling_to_image_size():
    t = _text()
    emb = np.zeros((2, 2, 4), np.float32)
    emb[:, 0, 0] = 1
    emb[:, 1, 2] = 1
    out = predict_labels(emb, t, out_size=(4, 6))
    assert out.shape == (4, 6)
    assert (out[:, :3] == 0).all() and (out[:, 3:] == 2).all()
    lo = similarity_logits(emb, t, (4, 6))
    assert tuple(lo.shape) == (3, 4, 6)
    out_e = predict_labels(emb, t, out_size=(4, 6), upsample="embeddings")
    assert np.array_equal(out, out_e)


def test_sliding_window_averages_overlaps():
    img = np.zeros((10, 14, 3), np.uint8)
    img[..., 0] = np.arange(14)[None, :]  # embedding = column index, full resolution

    def embed(crop):
        return crop[..., :1].astype(np.float32)

    out = sliding_window_embed(embed, img, window=6, stride=4)
    assert out.shape == (10, 14, 1)
    np.testing.assert_allclose(out[..., 0], np.tile(np.arange(14.0), (10, 1)))

    calls = []

    def embed_half(crop):  # stride-2 embedding, constant per window = window id
        calls.append(crop.shape)
        return np.full((crop.shape[0] // 2, crop.shape[1] // 2, 1), float(len(calls)), np.float32)

    out2 = sliding_window_embed(embed_half, np.zeros((8, 12, 3), np.uint8), window=(8, 8), stride=(8, 4))
    assert out2.shape == (4, 6, 1) and len(calls) == 2
    # window 1 covers grid cols 0..3, window 2 cols 2..5: overlap cols 2..3 averaged (1 + 2) / 2
    np.testing.assert_allclose(out2[0, :, 0], [1, 1, 1.5, 1.5, 2, 2])


def test_voc_modes():
    gt = np.array([[0, 1, 20, 255]])
    assert voc_gt_transform(gt, 21).tolist() == [[0, 1, 20, 255]]
    assert voc_gt_transform(gt, 20).tolist() == [[255, 0, 19, 255]]
    names = ["background"] + [f"c{i}" for i in range(1, 21)]
    n20, t20 = voc_text_subset(names, np.zeros((21, 4)), 20)
    assert len(n20) == 20 and n20[0] == "c1" and t20.shape == (20, 4)


class Rec:
    def __init__(self, image_id):
        self.image_id = image_id


def test_evaluate_language_end_to_end(tmp_path):
    t = _text()
    gts = {"a": np.array([[0, 0, 1, 1], [2, 2, 255, 1]]), "b/c": np.array([[1, 1, 1, 1], [0, 0, 0, 0]])}

    def embed_source(rec):
        gt = gts[rec.image_id]
        e = np.zeros(gt.shape + (4,), np.float32)
        g = np.where(gt == 255, 0, gt)
        e[np.arange(gt.shape[0])[:, None], np.arange(gt.shape[1])[None], g] = 1.0
        return e

    res = evaluate_language([Rec("a"), Rec("b/c")], lambda r: gts[r.image_id], embed_source, t,
                            ["x", "y", "z"], save_predictions=tmp_path)
    assert res["miou"] == 1.0 and res["n_images"] == 2 and res["pixels"] == 15
    saved = np.array(Image.open(tmp_path / "a.png"))
    assert Image.open(tmp_path / "b/c.png").mode == "P"
    assert saved.tolist() == [[0, 0, 1, 1], [2, 2, 0, 1]]

    # VOC-20 style: background ignored in GT, saved ids shifted back to dataset ids
    res20 = evaluate_language([Rec("a")], lambda r: gts[r.image_id], embed_source, t[1:],
                              ["y", "z"], save_predictions=tmp_path / "m20",
                              gt_transform=lambda g: voc_gt_transform(g, 20), save_offset=1)
    assert res20["pixels"] == 5 and res20["n_images"] == 1
    saved20 = np.array(Image.open(tmp_path / "m20" / "a.png"))
    assert saved20[0, 2] == 1 and saved20[1, 0] == 2
