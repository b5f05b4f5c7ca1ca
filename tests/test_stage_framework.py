"""The stage framework: fingerprints, parts, commit-by-index, resume, failures, ragged Zarr arrays."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import BaseModel

from clips4.pipeline import stage as stage_mod
from clips4.pipeline.cache import INDEX, UndeclaredOutputError, ItemResult, StageReader, StageWriter, list_stage_outputs
from clips4.pipeline.config import ConfigError, load_config
from clips4.pipeline.images import load_rgb


class ToyParams(BaseModel):
    scale: float = 1.0


class ToyProcessor:
    """A stage added the documented way: a params model, this processor, and a stages.yaml entry (see _cfg)."""

    kind = "per_image"
    version = "1"
    Params = ToyParams
    calls: list[str] = []

    def __init__(self, params, ctx):
        self.params = params

    def __call__(self, records):
        out = []
        for r in records:
            try:
                img = load_rgb(r.path)
            except Exception as exc:  # noqa: BLE001
                out.append(ItemResult.failed(str(exc)))
                continue
            ToyProcessor.calls.append(r.image_id)
            gray = (img.mean(axis=2) * self.params.scale).astype(np.float32)
            feats = np.stack([gray[::4, ::4], -gray[::4, ::4]], axis=-1).astype(np.float16)
            out.append(ItemResult(row={"mean": float(gray.mean())}, arrays={"gray": gray, "feat": feats},
                                  tables={"segs": {"segment_id": np.arange(2), "emb": np.ones((2, 3), np.float32)}}))
        return out


@pytest.fixture
def toy_stage():
    ToyProcessor.calls = []
    return "toy"


#: the toy stage's stages.yaml entry, as --set items
TOY = [f"stages.toy.run={__name__}:ToyProcessor", "stages.toy.deps=[dataset]", "stages.toy.outs=[gray, feat, segs]"]


def _cfg(tmp_path, root, *extra):
    return load_config(None, None, [f"cache_root={tmp_path / 'cache'}", "dataset.kind=folder", f"dataset.root={root}",
                                   "ray.executor=local", "ray.batch_size=4", *TOY, *extra], search=False)


def test_run_commit_resume_and_read(tmp_path, image_folder, toy_stage):
    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert run.processed == 6 and not run.failed
    r = StageReader(run.url)
    assert len(r) == 6
    img = load_rgb(str(image_folder / "img2.png"))
    np.testing.assert_array_equal(r.get("img2", "gray"), img.mean(axis=2).astype(np.float32))
    assert r.get("img2", "feat").shape == (9, 18, 2) and r.get("img2", "feat").dtype == np.float16
    segs = r.read_table("segs")
    assert segs.num_rows == 12 and pa.types.is_fixed_size_list(segs.schema.field("emb").type)
    # rerun: nothing to do
    ToyProcessor.calls = []
    again = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert again.nothing_to_do and ToyProcessor.calls == [] and again.url == run.url
    # a changed param: a new fingerprint, the old output intact
    cfg2 = _cfg(tmp_path, image_folder, "stages.toy.params.scale=2.0")
    run2 = stage_mod.run_stage(cfg2, "toy", show_progress=False)
    assert run2.url != run.url and run2.processed == 6
    assert StageReader(run.url).get("img0", "gray").max() <= 255
    assert {o["fingerprint"] for o in list_stage_outputs(str(tmp_path / "cache"))} == {run.fingerprint, run2.fingerprint}


def test_killed_run_leaves_nothing_that_looks_done_and_resumes(tmp_path, image_folder, toy_stage):
    cfg = _cfg(tmp_path, image_folder)
    url, fp, _ = stage_mod.stage_url(cfg, "toy", stage_mod.dataset_from_config(cfg))
    # simulate a run killed after one part: part written, no index
    w = StageWriter(url)
    recs = stage_mod.dataset_from_config(cfg).records()[:4]
    from clips4.pipeline.datasets import source_signature
    from clips4.pipeline.runner import process_batch

    process_batch(ToyProcessor(ToyParams(), {}), recs, [source_signature(r.path) for r in recs], url)
    assert not w.fs.exists(f"{w.path}/{INDEX}")
    with pytest.raises(Exception, match="not a finished stage output"):
        StageReader(url)
    ToyProcessor.calls = []
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert sorted(ToyProcessor.calls) == ["img4", "img5"] and run.skipped == 4
    assert len(StageReader(url)) == 6


def test_bad_images_are_recorded_not_fatal(tmp_path, image_folder, toy_stage):
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (image_folder / "text.png").write_text("hello")
    cfg = _cfg(tmp_path, image_folder)
    run = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert sorted(i for i, _ in run.failed) == ["broken", "text"]
    assert all("broken.jpg" in e or "text.png" in e for _, e in run.failed)
    r = StageReader(run.url)
    assert len(r) == 6 and r.errors().num_rows == 2
    assert stage_mod.print_summary(run, max_failures=0) == 1
    assert stage_mod.print_summary(run, max_failures=2) == 0
    # a rerun does not retry unchanged failures; a fixed file is processed again
    ToyProcessor.calls = []
    assert stage_mod.run_stage(cfg, "toy", show_progress=False).nothing_to_do
    import shutil

    (image_folder / "text.png").unlink()
    shutil.copy(image_folder / "img0.png", image_folder / "text.png")
    again = stage_mod.run_stage(cfg, "toy", show_progress=False)
    assert ToyProcessor.calls == ["text"] and [i for i, _ in again.failed] == []
    assert len(StageReader(run.url)) == 7


def test_outs_declared_in_stages_yaml_are_enforced(tmp_path, image_folder, toy_stage):
    cfg = _cfg(tmp_path, image_folder, "stages.toy.outs=[gray]")
    with pytest.raises(UndeclaredOutputError, match="do not declare"):
        stage_mod.run_stage(cfg, "toy", show_progress=False)


def test_unknown_dep_cycle_and_bad_run_are_config_errors(tmp_path, image_folder):
    with pytest.raises(ConfigError, match="unknown dep 'nonsense'.*valid: dataset"):
        _cfg(tmp_path, image_folder, "stages.prototypes.deps=[segments, dataset, nonsense]")
    with pytest.raises(ConfigError, match="cycle"):
        _cfg(tmp_path, image_folder, "stages.segments.deps=[toy]", "stages.toy.deps=[segments]")
    with pytest.raises(ConfigError, match="cannot be imported"):
        _cfg(tmp_path, image_folder, "stages.toy.run=no.such.module:Thing")
    with pytest.raises(ConfigError, match="add segments"):
        cfg = _cfg(tmp_path, image_folder, "stages.clip_features.deps=[dataset]", "clip_features.segment_source=ucm")
        cfg.stage_deps("clip_features")


def test_deps_from_stages_yaml_drive_the_fingerprint(tmp_path, image_folder):
    from clips4.pipeline.datasets import open_dataset

    ds = open_dataset("folder", str(image_folder))
    a = _cfg(tmp_path, image_folder, "stages.toy.deps=[dataset]")
    b = _cfg(tmp_path, image_folder, "stages.toy.deps=[dataset, segments]")
    _, _, deps_a = stage_mod.stage_url(a, "toy", ds)
    _, fp_b, deps_b = stage_mod.stage_url(b, "toy", ds)
    assert deps_a == {} and list(deps_b) == ["segments"]
    assert stage_mod.stage_url(a, "toy", ds)[1] != fp_b
