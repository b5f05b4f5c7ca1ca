"""Bundled data that clips4 needs at run time: class-name lists, the 85 prompt templates, configs.

These copies travel in the wheel (their sources: docs/datasets.md, "Class names and prompts").
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

#: name -> file under ``class_names/``. ``context60_detail`` is the Detail-API order used by the
#: Pascal-Context id masks (0 = background); ``context59`` is the MaskCLIP/mmseg order.
CLASS_LISTS = {
    "voc": "voc21.txt",  # 20 classes (the same list as ``voc20``); ``voc21`` keeps background first
    "voc20": "voc21.txt",
    "voc21": "voc21.txt",
    "context59": "context59.txt",
    "context60_detail": "context60_detail.txt",
    "cocostuff171": "cocostuff171.txt",
}

#: dataset list -> the names CLIP is prompted with, line for line (MaskCLIP's natural-language names, e.g.
#: ``diningtable`` -> ``dining table``, ``wall-brick`` -> ``brick wall``). Reports keep the dataset's names.
PROMPT_LISTS = {
    "voc21": "voc21_prompt.txt",
    "context59": "context59_prompt.txt",
    "cocostuff171": "cocostuff171_prompt.txt",
}


def _read_lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        # "12 dog" -> "dog"; plain names are kept as they are
        head, _, rest = line.partition(" ")
        out.append(rest.strip() if head.isdigit() and rest else line)
    return out


def class_names(name_or_path: str) -> list[str]:
    """Class names from a bundled list name (see ``CLASS_LISTS``) or a text file (one per line).

    ``voc20`` (also ``voc``) gives the 20 VOC object classes (no background); ``voc21`` gives all 21 with background
    first. Every command reads these names the same way.
    """
    if name_or_path in CLASS_LISTS:
        names = _read_lines(resources.files(__package__).joinpath("class_names", CLASS_LISTS[name_or_path]).read_text())
        return names[1:] if name_or_path in ("voc", "voc20") else names
    if "://" in name_or_path:  # a class list beside a dataset on object storage (classes: dataset)
        import fsspec

        try:
            with fsspec.open(name_or_path, "r") as f:
                text = f.read()
        except FileNotFoundError:
            text = None
    else:
        p = Path(name_or_path)
        text = p.read_text() if p.is_file() else None
    if text is None:
        raise FileNotFoundError(
            f"class list {name_or_path!r} is neither a bundled list ({', '.join(sorted(CLASS_LISTS))}) nor a file"
        )
    names = _read_lines(text)
    if not names:
        raise ValueError(f"class list file {name_or_path} holds no class names")
    return names


def _bundled(file: str) -> list[str]:
    return _read_lines(resources.files(__package__).joinpath("class_names", file).read_text())


_PROMPT_MAP: dict[str, str] | None = None


def prompt_name_map() -> dict[str, str]:
    """``{dataset class name: prompt name}`` for every bundled list, only where the two differ.

    One table for all lists: a name means the same thing wherever it appears (``aeroplane`` in VOC and Context),
    so names from a dataset's own label file or ``--classes`` are mapped too."""
    global _PROMPT_MAP
    if _PROMPT_MAP is None:
        table: dict[str, str] = {}
        for key, file in PROMPT_LISTS.items():
            names, prompts = _bundled(CLASS_LISTS[key]), _bundled(file)
            if len(names) != len(prompts):  # a packaging error, not user input
                raise RuntimeError(f"{file}: {len(prompts)} prompt names for {len(names)} classes of {key}")
            for n, p in zip(names, prompts):
                if n != p and table.setdefault(n, p) != p:
                    raise RuntimeError(f"class {n!r} has two prompt names: {table[n]!r} and {p!r}")
        _PROMPT_MAP = table
    return dict(_PROMPT_MAP)


def prompt_names(names: list[str]) -> list[str]:
    """The text CLIP is prompted with for each class name (same order); names without a natural-language
    variant are kept as they are. Use this wherever class names are put into prompt templates."""
    table = prompt_name_map()
    return [table.get(n, n) for n in names]


def prompt_templates() -> list[str]:
    """The 85 prompt templates (CLIP's 80 ImageNet templates + 5 scene templates); ``{}`` is the class name."""
    return [t for t in resources.files(__package__).joinpath("prompt_templates_85.txt").read_text().splitlines() if t.strip()]
