"""Every command with the input mistakes users make: the documented exit code (2 usage/config, 1 run failed) and
never a traceback; CLIPS4_DEBUG=1 shows it."""
from __future__ import annotations

import errno
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clips4.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    imgs = d / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")  # another program's checkpoint
    (d / "a_file").write_text("x")
    return d


def _s3_or_other_missing_protocol() -> str:
    for proto, pkg in (("s3", "s3fs"), ("gs", "gcsfs"), ("abfs", "adlfs")):
        if importlib.util.find_spec(pkg) is None:
            return f"{proto}://bucket/images"
    pytest.skip("every remote filesystem package is installed here")


CASES = {
    # name: (argv builder, expected exit code, text the message must contain)
    "set_bad_detector": (lambda w: ["precompute", "segments", "--root", str(w / "imgs"), "--set", "segments.detector=foo"], 2, "'classical'"),
    "flag_bad_detector": (lambda w: ["precompute", "segments", "--root", str(w / "imgs"), "--detector", "foo"], 2, "'classical'"),
    "bool_for_int": (lambda w: ["precompute", "segments", "--root", str(w / "imgs"), "--set", "segments.max_segments=true"], 2, "valid integer"),
    "unknown_key": (lambda w: ["precompute", "segments", "--root", str(w / "imgs"), "--set", "segments.ucm_treshold=0.3"], 2, "did you mean 'ucm_threshold'"),
    "unknown_option": (lambda w: ["precompute", "segments", "--bogus"], 2, "No such option"),
    "value_for_a_flag": (lambda w: ["evaluate", "language", "--calibration-guard=maybe"], 2, "does not take a value"),
    "missing_config": (lambda w: ["precompute", "segments", "--root", str(w / "imgs"), "--config", str(w / "nope.yaml")], 2, "not found"),
    "missing_root": (lambda w: ["precompute", "segments", "--root", str(w / "nope")], 2, "does not exist"),
    "no_root": (lambda w: ["precompute", "segments", "--cache", str(w / "c")], 2, "--root"),
    "unknown_clip_model": (lambda w: ["precompute", "clip-features", "--root", str(w / "imgs"), "--executor", "local",
                                      "--cache", str(w / "c"), "--clip-model", "ViT-Z-99"], 2, "ViT-Z-99"),
    "corrupt_clip_checkpoint": (lambda w: ["precompute", "clip-features", "--root", str(w / "imgs"), "--executor", "local",
                                           "--cache", str(w / "c"), "--clip-checkpoint", str(w / "corrupt.pt")], 2, "corrupt.pt"),
    "missing_fs_package": (lambda w: ["precompute", "segments", "--root", _s3_or_other_missing_protocol()], 2, "pip install"),
    "cache_is_a_file": (lambda w: ["precompute", "segments", "--root", str(w / "imgs"), "--executor", "local",
                                   "--cache", str(w / "a_file" / "cache")], 2, "a_file"),
    "prototypes_without_features": (lambda w: ["precompute", "prototypes", "--root", str(w / "imgs"), "-q",
                                               "--cache", str(w / "empty")], 2, "clips4 precompute clip-features"),
    "train_bad_value": (lambda w: ["train", "--root", str(w / "imgs"), "--set", "train.kappa=-1"], 2, "kappa"),
    "train_bad_ema": (lambda w: ["train", "--root", str(w / "imgs"), "--set", "train.ema=1.5"], 2, "ema"),
    "train_bad_collapse_guard": (lambda w: ["train", "--root", str(w / "imgs"), "--set", "train.collapse_guard=2"], 2, "collapse_guard"),
    "train_contours_bad_workers": (lambda w: ["train-contours", "--root", str(w / "imgs"), "--workers", "-1"], 2, "workers must be >= 0"),
    "language_bad_prior_mode": (lambda w: ["evaluate", "language", "--root", str(w / "imgs"), "--prior-matching", "train",
                                           "--prior-mode", "bogus"], 2, "--calibration-mode (--prior-mode) must be"),
    "language_bad_collapse_ratio": (lambda w: ["evaluate", "language", "--root", str(w / "imgs"), "--prior-matching", "train",
                                               "--calibration-mode", "raise", "--calibration-ratio", "1.5"], 2, "--calibration-ratio (--prior-collapse-ratio) must be"),
    "train_bad_backbone": (lambda w: ["train", "--root", str(w / "imgs"), "--backbone", "vgg"], 2, "'resnet50'"),
    "language_no_cache": (lambda w: ["evaluate", "language", "--root", str(w / "imgs"), "-q", "--cache", str(w / "empty")], 2, "precompute"),
    "davis_not_davis": (lambda w: ["evaluate", "davis", "--root", str(w / "imgs"), "--config", str(w / "nope.yaml")], 2, "not found"),
    "davis_wrong_layout": (lambda w: ["evaluate", "davis", "--root", str(w / "imgs"), "--out", str(w / "dv")], 2, "ImageSets"),
    "boundaries_no_root": (lambda w: ["evaluate", "boundaries"], 2, "--root"),
    "predict_corrupt_checkpoint": (lambda w: ["predict", str(w / "imgs" / "im0.png"), "--classes", "a,b",
                                              "--checkpoint", str(w / "corrupt.pt")], 2, "corrupt.pt"),
    "predict_foreign_checkpoint": (lambda w: ["predict", str(w / "imgs" / "im0.png"), "--classes", "a,b",
                                              "--checkpoint", str(w / "foreign.pt")], 2, "foreign.pt"),
    "avgsim_missing_checkpoint": (lambda w: ["evaluate", "avgsim", "--root", str(w / "imgs"), "--checkpoint", str(w / "nope.pt")], 2, "nope.pt"),
    "cache_ls_bad_config": (lambda w: ["cache", "ls", "--set", "ray.executor=spark"], 2, "'ray' or 'local'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exit_code_and_no_traceback(world, name, capfd):
    argv, code, text = CASES[name]
    rc = main(argv(world))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert rc == code, out + err
    assert text in out + err, out + err


def test_disk_full_is_a_run_failure_naming_the_cause(world, capfd, monkeypatch):
    import clips4.pipeline.cache as cache

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "write_bytes_atomic", full)
    rc = main(["precompute", "segments", "--root", str(world / "imgs"), "--executor", "local", "--cache", str(world / "full")])
    out, err = capfd.readouterr()
    assert rc == 1 and "No space left on device" in err and "Traceback" not in out + err


def test_debug_shows_the_traceback(world, capfd, monkeypatch):
    monkeypatch.setenv("CLIPS4_DEBUG", "1")
    assert main(["precompute", "segments", "--root", str(world / "nope")]) == 2
    assert "Traceback" in capfd.readouterr().err


def test_json_summary_also_for_errors(world, capfd):
    rc = main(["precompute", "segments", "--root", str(world / "imgs"), "--detector", "foo", "--json"])
    out, _ = capfd.readouterr()
    doc = json.loads(out)
    assert rc == 2 and doc["status"] == "usage_error" and doc["exit_code"] == 2 and "classical" in doc["error"]


def test_version_and_shared_options(capfd):
    assert main(["--version"]) == 0 and "clips4" in capfd.readouterr().out
    from typer.main import get_command

    from clips4.cli.app import app

    root = get_command(app)
    shared = {"--config", "--set", "--stages", "--dataset", "--root", "--split", "--limit", "--cache", "--executor",
              "--num-workers", "--quiet", "--json"}
    for path in (("precompute", "segments"), ("precompute", "clip-features"), ("precompute", "prototypes"), ("train",),
                 ("evaluate", "language"), ("evaluate", "unsupervised"), ("evaluate", "avgsim"),
                 ("evaluate", "class-free"), ("evaluate", "boundaries"), ("search",), ("predict",)):
        cmd = root
        for p in path:
            cmd = cmd.commands[p]
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert shared <= opts, f"{' '.join(path)} lacks {sorted(shared - opts)}"


def test_process_exit_keeps_the_status_output_atexit_and_threads(tmp_path):
    """The console entry leaves through ``exit_now`` (no native teardown, where pyarrow's thread pool can abort a
    finished run with SIGABRT): the status is main's, piped output arrives, atexit handlers and non-daemon threads
    finish first."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    script = f"""
import atexit, threading, time
from pathlib import Path
from clips4.cli.app import exit_now
atexit.register(lambda: Path({str(tmp_path / 'atexit')!r}).write_text('ran'))
threading.Thread(target=lambda: (time.sleep(0.3), Path({str(tmp_path / 'thread')!r}).write_text('joined'))).start()
print('buffered', end='')
exit_now(7)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout) == (7, "buffered"), p.stderr
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    p = subprocess.run([sys.executable, "-m", "clips4.cli", "train", "--set", "train.bogus=1"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "unknown key 'bogus'" in p.stderr and "Traceback" not in p.stderr
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clips4"] == "clips4.cli:run"
