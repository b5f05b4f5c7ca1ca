"""``clips4 synthetic make | config``: the synthetic world, where the truth is known."""
from __future__ import annotations

from pathlib import Path

import typer

from clips4.cli.common import Common, common_options, console, option


@common_options("synthetic make", dataset=None)
def make(
    opts: Common,
    root: Path = option("root", Path("outputs/synthetic-world"), help="Folder to write the world into."),
    n_train: int = typer.Option(64, help="Training images."),
    n_val: int = typer.Option(16, help="Held-out validation images."),
    n_classes: int = typer.Option(6, help="Number of textured classes (2..10)."),
    height: int = typer.Option(96, help="Image height."),
    width: int = option("width", 128, help="Image width."),
    seed: int = option("seed", 0, help="World seed (the teacher's backend_params.world_seed must match)."),
) -> dict:
    """Write a synthetic world (images/<split>, masks/<split>, classes.txt) for the folder dataset reader."""
    from clips4.synthetic import SyntheticWorld

    info = SyntheticWorld(n_classes=n_classes, image_size=(height, width), seed=seed).write(root, n_train, n_val)
    console.print(f"synthetic world: {info.get('train', 0)} train + {info.get('val', 0)} val images, "
                  f"classes {', '.join(info['classes'])} → {root}")
    return {"root": str(root), **info}


@common_options("synthetic config", dataset=None)
def config(opts: Common) -> dict:
    """Print the bundled synthetic-world config (save it and pass it with --config)."""
    from importlib import resources

    name = resources.files("clips4.data").joinpath("configs", "synthetic.yaml")
    text = name.read_text()
    if not opts.json:  # with --json, stdout carries only the summary
        print(text, end="")
    return {"config": str(name), "text": text}
