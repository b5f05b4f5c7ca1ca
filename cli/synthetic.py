"""``clips4 synthetic make | config``: the synthetic world, where the truth is known."""
from __future__ import annotations

from pathlib import Path

import typer

from clips4.cli.common import Common, common_options, console

app = typer.Typer(help="The synthetic world: textured classes with known masks and a CLIP-like teacher.",
                  no_args_is_help=True)


@app.command("make")
@common_options("synthetic make", dataset=None)
def make(
    opts: Common,
    root: Path = typer.Option(Path("outputs/synthetic-world"), "--root", help="Folder to write the world into."),
    n_train: int = typer.Option(64, help="Training images."),
    n_val: int = typer.Option(16, help="Held-out validation images."),
    n_classes: int = typer.Option(6, help="Number of textured classes (2..10)."),
    height: int = typer.Option(96, help="Image height."),
    width: int = typer.Option(128, help="Image width."),
    seed: int = typer.Option(0, help="World seed (the teacher's backend_params.world_seed must match)."),
) -> dict:
    """Write a synthetic world (images/<split>, masks/<split>, classes.txt) for the folder dataset reader."""
    from clips4.synthetic import SyntheticWorld

    info = SyntheticWorld(n_classes=n_classes, image_size=(height, width), seed=seed).write(root, n_train, n_val)
    console.print(f"synthetic world: {info.get('train', 0)} train + {info.get('val', 0)} val images, "
                  f"classes {', '.join(info['classes'])} → {root}")
    return {"root": str(root), **info}


@app.command("config")
def config() -> None:
    """Print the bundled synthetic-world config (save it and pass it with --config)."""
    from importlib import resources

    print(resources.files("clips4.data").joinpath("configs", "synthetic.yaml").read_text(), end="")
