"""An unreadable sub-folder of a folder dataset is reported, not skipped silently; embeddings of
different widths give an error naming both widths, not a numpy/torch shape error."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clips4.evaluate.compat import EmbeddingWidthError
from clips4.pipeline.datasets import DatasetError, open_dataset

REPO = Path(__file__).resolve().parents[1]


def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch, caplog):
    root = tmp_path / "imgs"
    for sub in ("a", "b", "b/deep"):
        (root / sub).mkdir(parents=True)
    for p in ("a/1.png", "b/2.png", "b/deep/3.png", "top.png"):
        Image.new("RGB", (8, 8)).save(root / p)
    ds = open_dataset("folder", str(root))
    real_ls = ds.fs.ls

    def ls(path, *a, **kw):  # tests run as root, where chmod 000 does not stop reading: fail the listing itself
        if path.rstrip("/").endswith("/b"):
            raise PermissionError(13, "Permission denied", path)
        return real_ls(path, *a, **kw)

    monkeypatch.setattr(ds.fs, "ls", ls)
    with caplog.at_level(logging.WARNING, logger="clips4.pipeline.datasets"):
        ids = [r.image_id for r in ds.records()]
    assert ids == ["a/1", "top"]
    assert len(ds.problems) == 1 and "cannot read sub-folder" in ds.problems[0] and "/b" in ds.problems[0]
    assert "Permission denied" in ds.problems[0]
    assert any("cannot read sub-folder" in r.getMessage() for r in caplog.records)

    ds2 = open_dataset("folder", str(root))
    monkeypatch.setattr(ds2.fs, "ls", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(DatasetError, match="cannot read"):
        ds2.records()


def test_predict_labels_names_both_widths():
    from clips4.evaluate.language import predict_labels

    with pytest.raises(EmbeddingWidthError, match=r"7-dim .* 5-dim"):
        predict_labels(np.ones((3, 4, 7), np.float32), np.ones((2, 5), np.float32), (6, 8), layout="hwd")
    assert predict_labels(np.ones((3, 4, 5), np.float32), np.eye(5, dtype=np.float32)[:2], (6, 8)).shape == (6, 8)


def _fake_checkpoint_source(dim: int):
    from clips4.evaluate.sources import EmbeddingSource

    emb = np.ones((2, 2, dim), np.float32) / np.sqrt(dim)
    return EmbeddingSource("fake", lambda rec: emb, "f" * 16, lambda img: emb,
                           info={"checkpoint": "runs/x/final.pt", "signature": {"embed_dim": dim}})


def test_checkpoint_wider_than_text_embeddings_is_a_clear_error(tmp_path):
    from clips4.evaluate.language import language_confusion

    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "val" / "x.png")
    Image.new("L", (8, 8)).save(root / "masks" / "val" / "x.png")
    ds = open_dataset("folder", str(root), "val")
    with pytest.raises(EmbeddingWidthError, match=r"runs/x/final\.pt gives 7-dim embeddings .* 5-dim"):
        language_confusion(_fake_checkpoint_source(7), ds, ["a", "b"], np.ones((2, 5), np.float32))


def test_predict_cli_exits_2_on_width_mismatch(tmp_path, monkeypatch, capsys):
    import clips4.evaluate.predict as tasks
    from clips4.cli import main

    img = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(img)
    ck = tmp_path / "final.pt"
    ck.write_bytes(b"")
    monkeypatch.setattr(tasks, "checkpoint_source", lambda path, device="auto", runs_root="runs": _fake_checkpoint_source(7))
    monkeypatch.setattr(tasks, "text_embeddings_for", lambda cfg, names: (np.ones((len(names), 5), np.float32), {}))
    monkeypatch.setattr(tasks, "source_text_embeddings",
                        lambda cfg, src, names: (np.ones((len(names), 5), np.float32), {}))
    rc = main(["predict", str(img), "--classes", "a,b", "--checkpoint", str(ck), "--out", str(tmp_path / "out"),
               "--stages", str(REPO / "stages.yaml")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert "7-dim" in err and "5-dim" in err and "Traceback" not in err
