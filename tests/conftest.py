"""Shared fixtures. Real sample data lives in ../shared/data beside the repo; tests needing it skip without it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# Two test processes share the machine's cores: one thread each (and in every process they start), so that
# torch's OpenMP threads do not spin against the other process's work
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"sample data {p} not present (it lives in ../shared/data beside the repo)")
    return p


@pytest.fixture
def shared_data():
    return shared_path()


@pytest.fixture
def image_folder(tmp_path):
    """Six small RGB images of different sizes with simple structure (blocks of colour + noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    for i, (h, w) in enumerate([(40, 60), (48, 48), (33, 71), (64, 40), (20, 30), (50, 50)]):
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2] = (200, 30, 30)
        img[h // 2 :, : w // 2] = (30, 200, 30)
        img[h // 2 :, w // 2 :] = (30, 30, 200)
        img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img{i}.png")
    return root


def box_images(folder: Path, n: int, hw: tuple[int, int] = (72, 96)) -> Path:
    """``n`` PNGs of four random coloured boxes each with noise, ``hw`` in size, in ``folder`` (created)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    H, W = hw
    for i in range(n):
        img = np.zeros((H, W, 3), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, H * 5 // 6), rng.integers(0, W * 5 // 6)
            img[y : y + H * 5 // 12, x : x + W * 5 // 12] = rng.integers(0, 255, 3)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{i:03d}.png")
    return folder


def make_synthetic(base: Path, n_train: int = 6, n_val: int = 3) -> list[str]:
    """A tiny synthetic world (``base/world``, caches in ``base/cache``) with segments + clip features for train and
    val; returns the CLI args that select it (its config files, one loader process, batch 4)."""
    from clips4.synthetic import build_world

    built = build_world(base, n_train, n_val, stages=("segments", "clip_features"), stages_file=REPO / "stages.yaml")
    return [*built.args(), "--set", "train.num_workers=0", "--set", "train.batch_size=4"]


def spec_world(tmp_path: Path, spec: dict, size: tuple[int, int], n_train: int, n_val: int, params: dict,
               prototypes_sets: tuple[str, ...] = ()):
    """A world built from ``spec`` (``{"world": SyntheticWorld kwargs, "teacher": SyntheticTeacher kwargs}``) with its
    segments and CLIP features (train and val) and prototypes under ``tmp_path``: a
    :class:`~clips4.synthetic.BuiltWorld`. ``params``: stage params over the bundled synthetic.yaml (e.g.
    ``{"train": {...}}``); ``prototypes_sets``: ``KEY=VALUE`` overrides of the prototypes stage."""
    from clips4.synthetic import build_world

    return build_world(tmp_path, n_train, n_val, world=spec, image_size=size, embed_dim=32, params=params,
                       overrides=prototypes_sets, stages_file=REPO / "stages.yaml")


# Files whose tests take longest (Ray start-ups, torchrun, training runs, subprocess runs), longest first. With
# `--dist loadfile` each file runs whole in one test process, and a process asks for the next file when it is
# almost done; xdist would hand out the files with the most tests first, which leaves these few-test, long files
# for the end, run by one process while the other has nothing left. They go first instead; every other file
# keeps its place after them (a file not listed only runs later).
LONG_FILES = ("test_spurious_cue.py", "test_faults.py", "test_ray_cluster.py", "test_ddp.py", "test_train.py",
              "test_project.py", "test_train_signals.py", "test_s3.py", "test_boundaries.py", "test_evaluate_cli.py",
              "test_sweep_smoke.py", "test_train_resume.py", "test_segments_stage.py", "test_stage_safety.py",
              "test_layout.py", "test_davis.py", "test_near_duplicates.py", "test_classfree.py", "test_invariances.py",
              "test_cli_errors.py", "test_clip.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    # stable: the tests of a file stay together and in their order
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
