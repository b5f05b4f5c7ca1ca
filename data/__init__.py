"""Bundled data that clips4 needs at run time: class-name lists, the 85 prompt templates, configs.

Users have no ``../shared``; these copies travel in the wheel (see SOURCES in the README).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

#: name -> file under ``class_names/``. ``context60_detail`` is the Detail-API order used by the
#: Pascal-Context id masks (0 = background); ``context59`` is the MaskCLIP/mmseg order.
CLASS_LISTS = {
    "voc": "voc21.txt",  # 20 classes; ``voc21`` keeps background first
    "voc21": "voc21.txt",
    "context59": "context59.txt",
    "context60_detail": "context60_detail.txt",
    "cocostuff171": "cocostuff171.txt",
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

    ``voc`` gives the 20 VOC object classes (no background); ``voc21`` gives all 21 with background first.
    """
    if name_or_path in CLASS_LISTS:
        names = _read_lines(resources.files(__package__).joinpath("class_names", CLASS_LISTS[name_or_path]).read_text())
        return names[1:] if name_or_path == "voc" else names
    p = Path(name_or_path)
    if not p.is_file():
        raise FileNotFoundError(
            f"class list {name_or_path!r} is neither a bundled list ({', '.join(sorted(CLASS_LISTS))}) nor a file"
        )
    names = _read_lines(p.read_text())
    if not names:
        raise ValueError(f"class list file {p} holds no class names")
    return names


def prompt_templates() -> list[str]:
    """The 85 prompt templates (CLIP's 80 ImageNet templates + 5 scene templates); ``{}`` is the class name."""
    return [t for t in resources.files(__package__).joinpath("prompt_templates_85.txt").read_text().splitlines() if t.strip()]
