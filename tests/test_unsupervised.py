import numpy as np
import pytest

from clips4.evaluate.unsupervised import (
    knn_classify,
    knn_segmentation,
    linear_segmentation,
    resize_nearest,
    segment_embeddings,
    segment_majority_labels,
    train_linear_classifier,
)


def test_segment_embeddings_and_majority_labels():
    emb = np.zeros((2, 4, 3), np.float32)
    emb[:, :2, 0] = 2.0
    emb[:, 2:, 1] = 1.0
    emb[0, 3, 2] = 1.0
    seg = np.array([[0, 0, 1, 1], [0, 0, 1, -1]])
    se = segment_embeddings(emb, seg)
    np.testing.assert_allclose(se[0], [1, 0, 0])
    np.testing.assert_allclose(se[1], np.array([0, 3, 1]) / np.sqrt(10), rtol=1e-6)
    gt = np.array([[1, 1, 2, 255], [0, 1, 255, 2]])
    lab = segment_majority_labels(seg, gt, num_classes=3)
    assert lab.tolist() == [1, 2]
    assert segment_majority_labels(np.array([[0, 1]]), np.array([[255, 0]]), 3).tolist() == [255, 0]


def test_resize_nearest():
    a = np.arange(16).reshape(4, 4)
    assert resize_nearest(a, (2, 2)).tolist() == [[5, 7], [13, 15]]


def test_knn_majority_vote_and_ties():
    train = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9]], np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    q = np.array([[1, 0.05], [0.05, 1]], np.float32)
    assert knn_classify(train, labels, q, k=3).tolist() == [0, 1]
    # tie 1-1 with k=2: the label with the larger summed similarity wins
    assert knn_classify(train, labels, np.array([[0.85, 0.15]], np.float32), k=2).tolist() == [0]
    # ignored training labels are not in the database
    assert knn_classify(train, np.array([255, 255, 255, 1, 1]), q, k=1).tolist() == [1, 1]


def test_knn_segmentation_miou():
    rng = np.random.default_rng(0)
    protos = np.eye(3, 8, dtype=np.float32)
    train = np.concatenate([protos[c] + 0.05 * rng.normal(size=(10, 8)) for c in range(3)]).astype(np.float32)
    tl = np.repeat(np.arange(3), 10)
    seg = np.array([[0, 0, 1, 1], [2, 2, 1, 1]])
    gt = np.array([[0, 0, 1, 1], [2, 2, 1, 255]])
    res = knn_segmentation(train, tl, [(protos, seg, gt)], num_classes=3, k=5)
    assert res["miou"] == 1.0 and res["method"] == "knn"


def test_linear_classifier_learns_separable_pixels():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(3, 16)).astype(np.float32)
    y = rng.integers(0, 3, 600)
    X = protos[y] + 0.1 * rng.normal(size=(600, 16)).astype(np.float32)
    y[:20] = 255  # ignored
    model = train_linear_classifier(X, y, 3, epochs=30, lr=0.05, batch_size=128, device="cpu")
    gt = rng.integers(0, 3, (4, 5))
    emb = protos[gt] + 0.05 * rng.normal(size=(4, 5, 16)).astype(np.float32)
    res = linear_segmentation(model, [(emb, np.kron(gt, np.ones((2, 2), int)))], 3)
    assert res["miou"] == pytest.approx(1.0)
