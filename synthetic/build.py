"""A synthetic world with its caches, ready to train on and evaluate: the one builder the tests, the benchmarks
and the sweep use.

``build_world`` writes the world's images and masks (:meth:`SyntheticWorld.write`), the bundled ``synthetic.yaml``
pointed at that folder, an overlay for what differs from the bundled world (a named or given world, image size,
the teacher's params, any stage params), and runs the pipeline's stages on it — the same
:func:`clips4.pipeline.stage.run_stage` that ``clips4 precompute`` runs, so finished work is skipped on a second
call.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from clips4.synthetic.presets import world_from_preset
from clips4.synthetic.world import SyntheticWorld

__all__ = ["BuiltWorld", "build_world"]

#: the stages a world is built with, in order (per split: segments and clip_features; train only: prototypes)
STAGES = ("segments", "clip_features", "prototypes")
#: the bundled config's world: 96 x 128 images; an overlay is written only where a world differs from it
_BUNDLED_SIZE = (96, 128)


@dataclass(frozen=True)
class BuiltWorld:
    """A world on disk and the config files that select it (layered over ``stages_file``, in this order)."""

    root: Path                     #: images/<split>, masks/<split>, classes.txt
    configs: tuple[Path, ...]      #: the bundled synthetic.yaml pointed at ``root``, then the world's overlay if any
    stages_file: Path | None       #: the stages.yaml given (None: the one ``load_config`` finds)
    n_classes: int

    def args(self) -> list[str]:
        """Command-line arguments that select this world: ``--stages`` (if given) and every ``--config``."""
        head = ["--stages", str(self.stages_file)] if self.stages_file is not None else []
        return head + [x for c in self.configs for x in ("--config", str(c))]

    def load(self, *overrides: str):
        """The resolved :class:`~clips4.pipeline.config.Config` of this world with ``overrides`` (``KEY=VALUE``)."""
        from clips4.pipeline.config import load_config

        return load_config(self.stages_file, list(self.configs), list(overrides))


def build_world(base: str | Path, n_train: int, n_val: int, *, world: str | dict | None = None, seed: int = 0,
                image_size: tuple[int, int] = _BUNDLED_SIZE, embed_dim: int = 64, teacher: dict | None = None,
                variants: int = 0, variant_params: dict | None = None, params: dict | None = None,
                stages: Sequence[str] = STAGES, splits: Sequence[str] = ("train", "val"),
                overrides: Sequence[str] = (), stages_file: str | Path | None = None,
                show_progress: bool = False) -> BuiltWorld:
    """Write a world into ``base/world``, its config files into ``base``, and run ``stages`` into ``base/cache``.

    ``world``: a name of :data:`~clips4.synthetic.WORLDS`, a ``{"world": ..., "teacher": ...}`` spec, or None (the
    bundled world); ``seed``: the world's seed (its teacher follows it). ``teacher``: SyntheticTeacher kwargs over
    the world's own (e.g. ``{"noise_sigma": 0}``); ``embed_dim``: the teacher's embedding size. ``variants`` /
    ``variant_params``: teacher photometric variants cached for the train split. ``params``: stage params over the
    config's, ``{stage: {key: value}}``, written into the overlay so that every later command reads them.
    ``stages``: which of segments / clip_features / prototypes to run (``splits`` for the first two; prototypes
    from the train split); ``overrides``: ``KEY=VALUE`` for those runs only (e.g. ``prototypes.top_m=8``).
    ``stages_file``: the stage graph (None: the one ``load_config`` finds from the working directory, which also
    layers a ``clips4.yaml`` found there under the world's config files).
    Raises ``RuntimeError`` naming the stage and split when a stage does not finish.
    """
    from clips4.pipeline.config import deep_merge
    from clips4.pipeline.stage import run_stage

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; valid: {', '.join(STAGES)}")
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    root = base / "world"
    w = (SyntheticWorld(seed=seed, image_size=image_size) if world is None
         else world_from_preset(world, image_size, seed)[0])
    marker = root / f".written-{n_train}-{n_val}-{seed}"
    if not marker.exists():
        w.write(root, n_train, n_val)
        marker.write_text("ok")
    text = resources.files("clips4.data").joinpath("configs", "synthetic.yaml").read_text()
    cfg = base / "synthetic.yaml"
    text = text.replace("cache_root: outputs/synthetic-world/cache", f"cache_root: {base / 'cache'}")
    cfg.write_text(text.replace("outputs/synthetic-world", str(root)).replace("world_seed: 0", f"world_seed: {seed}"))
    configs = [cfg]
    if world is not None or tuple(image_size) != _BUNDLED_SIZE or variants or teacher or params or embed_dim != 64:
        bp = {"world": world, "world_seed": seed, "image_size": list(image_size), "embed_dim": embed_dim,
              **(teacher or {})}
        over = {"clip_features": {"params": {"clip": {"backend_params": bp}, "n_clusters": w.n_classes,
                                             "photometric_variants": variants, "variant_params": variant_params or {}}}}
        over = deep_merge(over, {name: {"params": p} for name, p in (params or {}).items()})
        (base / "world.yaml").write_text(json.dumps({"stages": over}))
        configs.append(base / "world.yaml")
    built = BuiltWorld(root=root, configs=tuple(configs),
                       stages_file=None if stages_file is None else Path(stages_file),
                       n_classes=w.n_classes)
    runs = [(name, split) for split in splits for name in ("segments", "clip_features") if name in stages]
    runs += [("prototypes", "train")] if "prototypes" in stages else []
    for name, split in runs:
        run = run_stage(built.load(*overrides, f"dataset.split={split}"), name, show_progress=show_progress)
        if run.all_failed:
            img, err = run.all_failed[0]
            raise RuntimeError(f"synthetic world {root}: stage {name} (split {split}) failed on "
                               f"{len(run.all_failed)} image(s), e.g. {img}: {err}")
    return built
