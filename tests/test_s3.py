"""Every cache through a real S3-compatible server on 127.0.0.1 (moto's server mode, a subprocess).

The dataset root and the cache root are ``s3://`` URLs; endpoint and credentials come from the usual AWS_*
environment variables, as a user of MinIO or Ceph would set them. segments, clip-features (synthetic teacher),
prototypes and a short training run (with a DataLoader worker process) read and write through it, and
``clips4 cache ls`` lists it. The same pipeline on a local cache gives identical arrays and prototypes.
Readers never trust a listing: with S3 listing disabled, committed outputs still read in full, and files that
no index references (another run's parts, a killed run's leftovers) are never read.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from s3server import S3Server  # noqa: E402

from clips4.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages.yaml"
BUCKET = "clips4"
STAGE_NAMES = ("segments", "clip_features", "prototypes")


@pytest.fixture(scope="module")
def s3():
    with S3Server() as srv, pytest.MonkeyPatch.context() as mp:
        for k, v in srv.env.items():
            mp.setenv(k, v)
        srv.make_bucket(BUCKET)
        yield srv
    from clips4.pipeline import storage

    storage.configure(None)  # forget the endpoint (the server is gone)


def _world_config(base: Path, root: str, cache: str) -> Path:
    text = resources.files("clips4.data").joinpath("configs", "synthetic.yaml").read_text()
    text = text.replace("cache_root: outputs/synthetic-world/cache", f"cache_root: {cache}")
    text = text.replace("root: outputs/synthetic-world", f"root: {root}")
    text = text.replace("classes: outputs/synthetic-world/classes.txt", f"classes: {base / 'w' / 'classes.txt'}")
    cfg = base / f"cfg-{abs(hash(cache)) % 10**8}.yaml"
    cfg.write_text(text)
    return cfg


TRAIN = ["--set", "train.iterations=4", "--set", "train.batch_size=2", "--set", "train.crop_size=64",
         "--set", "train.num_workers=1", "--set", "train.checkpoint_every=2"]


def _pipeline(cfg: Path, out: Path) -> None:
    common = ["--stages", str(STAGES), "--config", str(cfg)]
    assert main(["precompute", "segments", *common, "--executor", "local", "-q"]) == 0
    assert main(["precompute", "clip-features", *common, "--executor", "local", "-q"]) == 0
    assert main(["precompute", "prototypes", *common]) == 0
    assert main(["train", *common, *TRAIN, "--out", str(out), "-q"]) == 0


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """The same tiny world run twice: dataset + caches on S3, and dataset + caches on local disk."""
    import fsspec

    from clips4.synthetic import SyntheticWorld

    base = tmp_path_factory.mktemp("s3world")
    SyntheticWorld(image_size=(48, 64)).write(base / "w", n_train=6, n_val=0)
    fs = fsspec.filesystem("s3", endpoint_url=s3.endpoint, key="testing", secret="testing")
    fs.put(str(base / "w" / "images"), f"{BUCKET}/data/w/images", recursive=True)
    fs.put(str(base / "w" / "classes.txt"), f"{BUCKET}/data/w/classes.txt")
    s3_cfg = _world_config(base, f"s3://{BUCKET}/data/w", f"s3://{BUCKET}/cache")
    local_cfg = _world_config(base, str(base / "w"), str(base / "cache"))
    _pipeline(s3_cfg, base / "train-s3")
    _pipeline(local_cfg, base / "train-local")
    return {"s3": s3_cfg, "local": local_cfg, "base": base, "fs": fs}


def _readers(cfg: Path):
    from clips4.pipeline.config import load_config
    from clips4.pipeline.stage import dataset_from_config, open_stage

    c = load_config(STAGES, [cfg])
    ds = dataset_from_config(c)
    return {name: open_stage(c, name, ds) for name in STAGE_NAMES}


def test_every_cache_is_written_to_and_read_from_s3(runs, tmp_path, monkeypatch):
    from clips4.pipeline.prototypes import PrototypeSet
    from clips4.trainer.checkpoint import load_checkpoint

    fs = runs["fs"]
    remote, local = _readers(runs["s3"]), _readers(runs["local"])
    for name in STAGE_NAMES:
        assert remote[name].url.startswith(f"s3://{BUCKET}/cache/"), remote[name].url
        assert fs.exists(remote[name].url[len("s3://"):] + "/index.parquet")
    # nothing leaked onto local disk as a folder literally named "s3:"
    assert not Path("s3:").exists() and not (runs["base"] / "s3:").exists()
    assert sorted(remote["segments"].image_ids) == sorted(local["segments"].image_ids) and len(remote["segments"]) == 6
    for img in local["segments"].image_ids:
        for f in ("contours", "ucm", "labels"):
            np.testing.assert_array_equal(remote["segments"].get(img, f), local["segments"].get(img, f))
        for f in ("features", "segment_labels"):
            np.testing.assert_array_equal(remote["clip_features"].get(img, f), local["clip_features"].get(img, f))
    seg_r = remote["clip_features"].read_table("segments").sort_by("row_id")
    seg_l = local["clip_features"].read_table("segments").sort_by("row_id")
    assert seg_r.num_rows == seg_l.num_rows > 0
    assert seg_r.column("embedding").equals(seg_l.column("embedding"))

    with fs.open(remote["prototypes"].url[len("s3://"):] + "/prototypes.parquet", "rb") as f:
        import pyarrow.parquet as pq

        p_r = PrototypeSet.from_table(pq.read_table(f))
    p_l = PrototypeSet.load(local["prototypes"].url + "/prototypes.parquet")
    assert p_r.names == p_l.names and p_r.n_known == 6
    np.testing.assert_array_equal(p_r.vectors, p_l.vectors)

    # the training run read its three inputs from S3 (recorded in config.json) and finished
    out = runs["base"] / "train-s3"
    conf = json.loads((out / "config.json").read_text())
    assert all(conf["deps"][n].startswith("s3://") for n in STAGE_NAMES), conf["deps"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(np.isfinite(r["total"]) for r in rows)
    assert load_checkpoint(out / "final.pt")["step"] == 4


def test_cache_ls_lists_the_s3_cache(runs, capsys):
    capsys.readouterr()
    assert main(["cache", "ls", "--stages", str(STAGES), "--cache", f"s3://{BUCKET}/cache", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["outputs"]
    by_stage = {r["stage"]: r for r in rows}
    assert set(by_stage) >= set(STAGE_NAMES)
    for name in ("segments", "clip_features"):
        r = by_stage[name]
        assert (r["state"], r["images"], r["failed"]) == ("done", 6, 0), r
        assert r["url"].startswith(f"s3://{BUCKET}/cache/") and r["bytes"] > 0
    assert by_stage["prototypes"]["state"] == "done"
    # the table form works too
    assert main(["cache", "ls", "--stages", str(STAGES), "--cache", f"s3://{BUCKET}/cache"]) == 0
    assert "clip_features" in capsys.readouterr().out


def test_readers_use_the_index_not_a_listing(runs, monkeypatch):
    """On S3 a listing is not a commit record: committed data reads in full without one, and files that no index
    references (another job's parts in progress, a killed run's leftovers) are never read."""
    import pyarrow as pa
    import s3fs

    from clips4.pipeline.cache import CacheError, StageReader, write_parquet_atomic

    fs = runs["fs"]
    remote = _readers(runs["s3"])
    cf = remote["clip_features"]
    n_rows = cf.read_table("segments").num_rows
    img = cf.image_ids[0]
    # a stray table file in the committed folder, with rows for a committed image: not in the index, never read
    stray = pa.table({"image_id": [img], "segment_id": [99], "row_id": [123], "part": ["zzzz-stray"],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(64, np.float32)), 64)})
    write_parquet_atomic(cf.url + "/tables/segments/zzzz-stray.parquet", stray)
    # a folder with parts but no index (a run still going, or killed): not a finished output
    unfinished = cf.url.rsplit("/", 1)[0] + "/0000unfinished000"
    for key in ("meta.json", f"parts/{cf.row(img)['part']}.parquet"):
        fs.copy(cf.url[len("s3://"):] + "/" + key, unfinished[len("s3://"):] + "/" + key)

    def no_listing(*a, **k):
        raise AssertionError("a reader listed the bucket")

    for meth in ("_ls", "_lsdir", "_find", "_glob", "_walk", "_du"):
        monkeypatch.setattr(s3fs.S3FileSystem, meth, no_listing)
    s3fs.S3FileSystem.clear_instance_cache()
    again = StageReader(cf.url)
    assert again.read_table("segments").num_rows == n_rows
    np.testing.assert_array_equal(again.get(img, "features"), cf.get(img, "features"))
    with pytest.raises(CacheError, match="not a finished stage output"):
        StageReader(unfinished)
    monkeypatch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    rows = {r["url"]: r for r in json.loads(_ls_json(runs))}
    assert rows[unfinished]["state"] == "incomplete" and rows[cf.url]["state"] == "done"


def _ls_json(runs) -> str:
    import io
    from contextlib import redirect_stdout

    from clips4.pipeline.cache import list_stage_outputs

    buf = io.StringIO()
    with redirect_stdout(buf):
        print(json.dumps(list_stage_outputs(f"s3://{BUCKET}/cache"), default=str))
    return buf.getvalue()


def test_s3_url_without_s3fs_is_a_clear_error(monkeypatch, capsys, tmp_path):
    """No traceback: exit 2 and a message naming the URL and the install command."""
    import fsspec

    real = fsspec.get_filesystem_class

    def missing(proto):
        if proto in ("s3", "s3a"):
            raise ImportError("Install s3fs to access S3")
        return real(proto)

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    capsys.readouterr()
    code = main(["cache", "ls", "--stages", str(STAGES), "--cache", "s3://bucket/cache"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "s3://bucket/cache" in err and "s3fs" in err and '.[s3]' in err
    assert "Traceback" not in err


def test_storage_section_is_validated_and_applied(tmp_path, monkeypatch):
    import fsspec.config

    from clips4.pipeline import storage
    from clips4.pipeline.config import ConfigError, load_config

    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "FSSPEC_S3"):
        monkeypatch.delenv(k, raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  s3:\n    endpoint: http://127.0.0.1:9000\n")
    with pytest.raises(ConfigError, match=r"storage\.s3\.endpoint.*did you mean 'endpoint_url'"):
        load_config(STAGES, [bad])
    good = tmp_path / "good.yaml"
    good.write_text("storage:\n  s3:\n    endpoint_url: http://127.0.0.1:9000\n    region: eu-west-3\n")
    try:
        load_config(STAGES, [good])
        want = {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-3"}}
        assert fsspec.config.conf["s3"] == want
        assert json.loads(storage.worker_env()["FSSPEC_S3"]) == want  # inherited by worker processes
    finally:
        storage.configure(None)
    assert "s3" not in fsspec.config.conf


def test_status_reads_an_s3_project(runs, capsys):
    """`clips4 status` on a dataset and cache in S3: up to date after the stages ran, and a new image uploaded to the
    bucket makes the per-image stages stale (1 new image) and prototypes stale after them."""
    capsys.readouterr()
    common = ["--stages", str(STAGES), "--config", str(runs["s3"]), "--until", "prototypes", "--json"]
    assert main(["status", *common]) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["up_to_date"] and all(s["url"].startswith(f"s3://{BUCKET}/cache/") for s in doc["stages"])
    fs = runs["fs"]
    src = sorted(fs.ls(f"{BUCKET}/data/w/images/train"))[0]
    fs.copy(src, f"{BUCKET}/data/w/images/train/zz-new.png")
    try:
        assert main(["status", *common]) == 1
        by = {s["stage"]: s for s in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]}
        assert by["segments"]["todo"] == 1 and "1 new image" in by["segments"]["reasons"][0]
        assert by["prototypes"]["state"] == "stale"
    finally:
        fs.rm(f"{BUCKET}/data/w/images/train/zz-new.png")
