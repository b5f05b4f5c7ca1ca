"""Ids and sequence names from split files must not escape the folders they are joined to."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clips4.evaluate.palette import save_indexed_png
from clips4.pipeline.datasets import DatasetError, open_dataset
from clips4.pipeline.safepath import UnsafePathError, check_name, output_path


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_davis(root: Path, seqs: dict[str, int], size=(24, 32)) -> None:
    """A tiny DAVIS layout: ``seqs`` maps sequence name -> number of frames; one square object moving right."""
    h, w = size
    rng = np.random.default_rng(0)
    for name, n in seqs.items():
        fdir = root / "JPEGImages" / "480p" / name
        adir = root / "Annotations" / "480p" / name
        fdir.mkdir(parents=True, exist_ok=True)
        adir.mkdir(parents=True, exist_ok=True)
        for t in range(n):
            img = (rng.random((h, w, 3)) * 40).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            mask[6:16, 4 + t : 14 + t] = 1
            img[mask == 1] = (220, 30, 30)
            Image.fromarray(img).save(fdir / f"{t:05d}.jpg", quality=95)
            save_indexed_png(adir / f"{t:05d}.png", mask)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{s}\n" for s in seqs))


# ----------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("bad", ["/abs/seq", "../x", "a/../../b", "..", "a\\b", "C:x", "", "a\x00b", "."])
def test_check_name_refuses_escaping_names(bad):
    with pytest.raises(UnsafePathError):
        check_name(bad, allow_subdirs=True)


def test_check_name_plain_and_nested():
    assert check_name("2007_000032") == "2007_000032"
    assert check_name("car-shadow") == "car-shadow"
    with pytest.raises(UnsafePathError, match="plain name"):
        check_name("a/b")
    assert check_name("a/b", allow_subdirs=True) == "a/b"
    with pytest.raises(UnsafePathError, match=r"val\.txt line 3: unsafe sequence name '/x'"):
        check_name("/x", what="sequence name", source="val.txt", line=3)


def test_output_path_stays_under_base(tmp_path):
    out = tmp_path / "out"
    assert output_path(out, "a", "b.png") == out / "a" / "b.png"
    for parts in (("/etc/passwd",), ("..", "x.png"), ("a/../../x.png",)):
        with pytest.raises(UnsafePathError):
            output_path(out, *parts)
    # a symlink inside the output folder pointing elsewhere is refused too
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "link")
    with pytest.raises(UnsafePathError, match="outside the output folder"):
        output_path(out, "link", "x.png")


# ----------------------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("bad", ["/abs/name", "../../name", "sub/name"])
def test_voc_split_file_with_escaping_id_is_refused(tmp_path, bad):
    root = tmp_path / "voc"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (8, 8)).save(root / "JPEGImages" / "ok.jpg")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(f"ok\n{bad}\n")
    ds = open_dataset("voc", str(root), "val")
    with pytest.raises(DatasetError, match=r"val\.txt line 2: unsafe image id"):
        ds.records()


def test_davis_reader_refuses_absolute_sequence(tmp_path):
    root = tmp_path / "davis"
    make_davis(root, {"seq": 3})
    (root / "ImageSets" / "2017" / "val.txt").write_text(f"seq\n{tmp_path / 'victim'}\n")
    with pytest.raises(DatasetError, match=r"val\.txt line 2: unsafe sequence name"):
        open_dataset("davis", str(root), "val").records()


# ----------------------------------------------------------------------------------------------- writers
def test_evaluate_davis_does_not_overwrite_gt_outside_out(tmp_path):
    """The reported attack: a val.txt line naming an absolute folder made the masks land on that folder's GT."""
    from clips4.evaluate import davis as dv
    from clips4.cli import main

    root = tmp_path / "davis"
    make_davis(root, {"seq": 4})
    victim = tmp_path / "victim"
    make_davis(victim, {"v": 4})
    gt_dir = victim / "Annotations" / "480p" / "v"
    # the attacker's absolute path holds both frames and annotations (load_sequence joins root / abs -> abs)
    for p in (victim / "JPEGImages" / "480p" / "v").iterdir():
        (gt_dir / p.name).write_bytes(p.read_bytes())
    before = _digest(gt_dir)
    (root / "ImageSets" / "2017" / "val.txt").write_text(f"seq\n{gt_dir}\n")
    with pytest.raises(DatasetError, match=r"val\.txt line 2"):
        dv.run_davis(root, tmp_path / "out", embedding="color", device="cpu")
    rc = main(["evaluate", "davis", "--root", str(root), "--out", str(tmp_path / "out2"), "--device", "cpu"])
    assert rc == 2
    with pytest.raises(UnsafePathError):
        dv.run_davis(root, tmp_path / "out3", sequences=["../victim"], embedding="color", device="cpu")
    assert _digest(gt_dir) == before


def test_save_predictions_refuses_ids_outside_the_folder(tmp_path):
    from clips4.evaluate.language import evaluate_language

    class Rec:
        def __init__(self, image_id):
            self.image_id = image_id

    out = tmp_path / "preds"
    gt = np.zeros((4, 4), np.int64)
    emb = np.zeros((2, 2, 3), np.float32)
    emb[..., 0] = 1
    text = np.eye(3, dtype=np.float32)[:2]
    res = evaluate_language([Rec("a"), Rec("sub/b")], lambda r: gt, lambda r: emb, text, ["x", "y"], 255, out)
    assert res["n_images"] == 2 and (out / "a.png").is_file() and (out / "sub" / "b.png").is_file()
    target = tmp_path / "outside"
    for bad in (str(target), "../outside"):
        with pytest.raises(UnsafePathError):
            evaluate_language([Rec(bad)], lambda r: gt, lambda r: emb, text, ["x", "y"], 255, out)
    assert not (tmp_path / "outside.png").exists()
