"""Dataset readers: one interface, one class per on-disk layout.

A dataset is addressed by ``kind`` + ``root`` (+ ``split``). ``root`` is a local path or an fsspec URL.
Every reader yields ``ImageRecord``s (image id, path, split, size, ground-truth path) in a stable order
(sorted by id), and knows how to load its ground truth as ``(H, W) int64`` ids with 255 = ignore.

Layouts:
- ``folder``: any folder of images, searched recursively (``.jpg .jpeg .png .bmp .tif .tiff .webp .gif .ppm``).
  Optional ground truth: a sibling ``masks/`` tree mirroring ``images/`` (``<root>/images/<split>/x.jpg`` ↔
  ``<root>/masks/<split>/x.png``), and an optional ``classes.txt``. With ``split`` the search starts at
  ``<root>/images/<split>`` (or ``<root>/<split>``).
- ``voc``: Pascal VOC 2012 (``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation/<split>.txt``);
  21 classes (background first) + 255 ignore.
- ``context``: Pascal-Context 59 id masks (``JPEGImages``, ``SegmentationClassContext``, ``<split>.txt``); ids
  0..59 in ``labels_context60.txt`` order, 0 = background (mapped to 255 for the 59-class protocol).
- ``cocostuff``: COCO-Stuff 164k (``images/<split>2017``, ``annotations/<split>2017/*.png`` with 0..181 ids,
  255 unlabeled), mapped to the 171 used classes.
- ``davis``: DAVIS 2017 (``JPEGImages/480p/<seq>/*.jpg``, ``Annotations/480p/<seq>/*.png`` palette masks,
  ``ImageSets/2017/<split>.txt``); image id ``<seq>/<frame>``.
- ``bsds``: BSDS500 (``images/<split>/*.jpg``, ``groundTruth/<split>/*.mat``); ``load_gt`` returns the first
  annotator's segmentation, ``load_bsds_gt`` all of them with boundaries.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import fsspec
import numpy as np

from clips4 import data as bundled
from clips4.pipeline.images import ImageError, image_size, load_label_png
from clips4.pipeline.safepath import UnsafePathError, check_name

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
IGNORE = 255
log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image of a dataset. ``height``/``width`` are -1 when the header could not be read."""

    image_id: str
    path: str
    split: str | None = None
    gt_path: str | None = None
    height: int = -1
    width: int = -1
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "image_id": self.image_id,
            "path": self.path,
            "split": self.split,
            "gt_path": self.gt_path,
            "height": self.height,
            "width": self.width,
        }


class DatasetError(ValueError):
    """A dataset root or split does not have the expected layout."""


def _fs(root: str):
    fs, path = fsspec.core.url_to_fs(root)
    return fs, path.rstrip("/")


class Dataset:
    """Base reader. Subclasses implement ``_list()``; ``records()`` adds sizes and caches the list."""

    kind: ClassVar[str] = ""
    default_split: ClassVar[str | None] = None
    #: ids with this value in ground truth are ignored by metrics
    ignore_index: int = IGNORE

    def __init__(self, root: str, split: str | None = None, *, limit: int | None = None):
        root = str(root)
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))  # one cache key however the path is spelt
        self.root = root.rstrip("/") or "/"
        self.fs, self.path = _fs(self.root)
        self.split = split if split is not None else self.default_split
        self.limit = limit
        self._records: list[ImageRecord] | None = None
        #: what listing skipped (unreadable sub-folders, ...): logged as warnings and kept for run summaries
        self.problems: list[str] = []
        if not self.fs.exists(self.path):
            raise DatasetError(f"{self.kind} dataset root {self.root!r} does not exist")

    # URL of a path inside the dataset, in the same protocol as the root
    def url(self, path: str) -> str:
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return path if proto in ("file", "local") else f"{proto}://{path}"

    @property
    def key(self) -> str:
        """Cache namespace: kind, split and a short hash of the root URL (two roots never share caches)."""
        h = hashlib.sha256(self.root.encode()).hexdigest()[:8]
        return f"{self.kind}-{self.split or 'all'}-{h}"

    @property
    def class_names(self) -> list[str] | None:
        return None

    @property
    def num_classes(self) -> int | None:
        names = self.class_names
        return len(names) if names is not None else None

    def _list(self) -> list[ImageRecord]:
        raise NotImplementedError

    def records(self) -> list[ImageRecord]:
        if self._records is None:
            try:  # object stores' clients cache listings per process: a folder that grew must be listed anew
                self.fs.invalidate_cache()
            except (AttributeError, NotImplementedError, OSError):
                pass
            recs = sorted(self._list(), key=lambda r: r.image_id)
            if self.limit is not None:
                recs = recs[: self.limit]
            for r in recs:
                if r.height < 0:
                    r.height, r.width = image_size(r.path)
            self._records = recs
        return self._records

    def load_gt(self, record: ImageRecord) -> np.ndarray:
        """Ground truth of ``record`` as ``(H, W) int64``; 255 = ignore."""
        if not record.gt_path:
            raise DatasetError(f"{self.kind} image {record.image_id!r} has no ground truth")
        return load_label_png(record.gt_path)

    def _problem(self, msg: str) -> None:
        from clips4.pipeline.names import display

        msg = display(msg)  # a folder name with a newline or undecodable bytes stays on one printable line
        self.problems.append(msg)
        log.warning("%s", msg)

    def describe(self) -> dict:
        return {"kind": self.kind, "root": self.root, "split": self.split, "key": self.key}

    def _images_with_gt(self, img_dir: str, gt_path: Callable[[str], str]) -> list[ImageRecord]:
        """Every ``*.jpg`` in ``img_dir``, with its ground truth at ``gt_path(image_id)`` where that file exists."""
        if not self.fs.isdir(img_dir):
            raise DatasetError(f"{self.kind}: {self.url(img_dir)} not found (split={self.split!r})")
        recs = []
        for p in self.fs.glob(f"{img_dir}/*.jpg"):
            i = posixpath.basename(p).rsplit(".", 1)[0]
            gt = gt_path(i)
            recs.append(ImageRecord(i, self.url(p), self.split, self.url(gt) if self.fs.exists(gt) else None))
        return recs

    def _read_ids(self, relpath: str, what: str = "image id") -> list[str]:
        p = f"{self.path}/{relpath}"
        if not self.fs.exists(p):
            raise DatasetError(f"{self.kind}: split file {self.url(p)} not found (split={self.split!r})")
        with self.fs.open(p, "r") as f:
            lines = f.read().splitlines()
        ids = []
        # ids become file names (ours and the dataset's): a line like '/abs/x' or '../x' must not escape
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    ids.append(check_name(line.split()[0], what=what, source=self.url(p), line=n))
                except UnsafePathError as exc:
                    raise DatasetError(str(exc)) from None
        return ids


class FolderDataset(Dataset):
    kind = "folder"

    def _image_dir(self) -> str:
        if self.split is None:
            return self.path
        for cand in (f"{self.path}/images/{self.split}", f"{self.path}/{self.split}"):
            if self.fs.isdir(cand):
                return cand
        raise DatasetError(f"folder dataset {self.root!r}: no images/{self.split}/ or {self.split}/ folder")

    def _list(self) -> list[ImageRecord]:
        base = self._image_dir()
        files = [p for p in self._find_files(base) if p.lower().endswith(IMAGE_EXTS)]
        # a masks/ tree next to images/ is ground truth, never input
        mask_root = f"{self.path}/masks"
        files = [p for p in files if not p.startswith(mask_root + "/")]
        recs = []
        for p in files:
            rel = p[len(base) + 1 :]
            image_id = rel.rsplit(".", 1)[0]
            gt = None
            if self.split is not None or self.fs.isdir(f"{self.path}/images"):
                img_root = f"{self.path}/images" + (f"/{self.split}" if self.split else "")
                if p.startswith(img_root + "/"):
                    cand = f"{mask_root}{'/' + self.split if self.split else ''}/{image_id}.png"
                    if self.fs.exists(cand):
                        gt = self.url(cand)
            recs.append(ImageRecord(image_id, self.url(p), self.split, gt))
        if not recs:
            raise DatasetError(f"folder dataset {self.root!r}: no images ({', '.join(IMAGE_EXTS)}) found under {base}")
        return recs

    def _find_files(self, base: str) -> list[str]:
        """Every file under ``base``, recursively. ``fs.find`` would silently skip a sub-folder it cannot list
        (a permission error hides its images); such folders are reported through :meth:`_problem` instead."""
        files, todo = [], [base]
        while todo:
            d = todo.pop()
            try:
                entries = self.fs.ls(d, detail=True)
            except OSError as exc:
                if d == base:
                    raise DatasetError(f"folder dataset {self.root!r}: cannot read {self.url(d)}: {exc}") from None
                self._problem(f"folder dataset {self.root!r}: cannot read sub-folder {self.url(d)} "
                              f"({exc.strerror or exc}); its images are skipped")
                continue
            for e in entries:
                name = e["name"].rstrip("/")
                if name == d:
                    continue
                (todo if e["type"] == "directory" else files).append(name)
        return sorted(files)

    @property
    def class_names(self) -> list[str] | None:
        p = f"{self.path}/classes.txt"
        if self.fs.exists(p):
            with self.fs.open(p, "r") as f:
                return [x.strip() for x in f.read().splitlines() if x.strip()]
        return None


class VOCDataset(Dataset):
    kind = "voc"
    default_split = "val"

    def _list(self) -> list[ImageRecord]:
        ids = self._read_ids(f"ImageSets/Segmentation/{self.split}.txt")
        recs = []
        for i in ids:
            gt = f"{self.path}/SegmentationClass/{i}.png"
            recs.append(
                ImageRecord(i, self.url(f"{self.path}/JPEGImages/{i}.jpg"), self.split, self.url(gt) if self.fs.exists(gt) else None)
            )
        return recs

    @property
    def class_names(self) -> list[str]:
        return bundled.class_names("voc21")


class ContextDataset(Dataset):
    """Pascal-Context 59: masks hold 0..59 in Detail-API order, 0 = background (ignored, 255)."""

    kind = "context"
    default_split = "val"

    def _list(self) -> list[ImageRecord]:
        ids = self._read_ids(f"{self.split}.txt") if self.fs.exists(f"{self.path}/{self.split}.txt") else [
            posixpath.basename(p).rsplit(".", 1)[0] for p in self.fs.glob(f"{self.path}/JPEGImages/*.jpg")
        ]
        recs = []
        for i in ids:
            gt = f"{self.path}/SegmentationClassContext/{i}.png"
            recs.append(
                ImageRecord(i, self.url(f"{self.path}/JPEGImages/{i}.jpg"), self.split, self.url(gt) if self.fs.exists(gt) else None)
            )
        return recs

    @property
    def class_names(self) -> list[str]:
        labels = f"{self.path}/labels_context60.txt"
        if self.fs.exists(labels):
            with self.fs.open(labels, "r") as f:
                names = bundled._read_lines(f.read())
        else:
            names = bundled.class_names("context60_detail")
        return names[1:]  # 59 classes; background is ignored

    def load_gt(self, record: ImageRecord) -> np.ndarray:
        gt = super().load_gt(record)
        out = gt - 1  # 1..59 -> 0..58
        out[(gt == 0) | (gt > 59)] = IGNORE
        return out


class CocoStuffDataset(Dataset):
    """COCO-Stuff 164k label PNGs: ids 0..181 (91 things incl. 11 unused ids + 91 stuff), 255 unlabeled."""

    kind = "cocostuff"
    default_split = "val"

    def _list(self) -> list[ImageRecord]:
        return self._images_with_gt(f"{self.path}/images/{self.split}2017",
                                    lambda i: f"{self.path}/annotations/{self.split}2017/{i}.png")

    @property
    def class_names(self) -> list[str]:
        return bundled.class_names("cocostuff171")

    # The 182 raw ids skip 11 unused thing ids; this table maps raw id -> 0..170 (255 otherwise).
    _UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

    def load_gt(self, record: ImageRecord) -> np.ndarray:
        gt = super().load_gt(record)
        lut = np.full(256, IGNORE, dtype=np.int64)
        used = [i for i in range(182) if i not in self._UNUSED]
        lut[used] = np.arange(len(used))
        return lut[np.clip(gt, 0, 255)]


class DavisDataset(Dataset):
    kind = "davis"
    default_split = "val"

    def sequences(self) -> list[str]:
        p = f"{self.path}/ImageSets/2017/{self.split}.txt"
        if self.fs.exists(p):
            return self._read_ids(f"ImageSets/2017/{self.split}.txt", "sequence name")
        frames = f"{self.path}/JPEGImages/480p"
        if not self.fs.isdir(frames):
            raise DatasetError(f"davis: {self.root} is not a DAVIS 2017 folder: neither ImageSets/2017/{self.split}.txt "
                               f"nor JPEGImages/480p/ exists")
        return sorted(posixpath.basename(p) for p in self.fs.ls(frames) if self.fs.isdir(p))

    def sequence_records(self, name: str) -> list[ImageRecord]:
        """The frames of sequence ``name`` in frame order, each with its own annotation (matched by frame name,
        ``None`` where that frame has none)."""
        return sorted((r for r in self.records() if r.meta.get("sequence") == name), key=lambda r: r.meta["frame"])

    def _list(self) -> list[ImageRecord]:
        recs = []
        for seq in self.sequences():
            for p in sorted(self.fs.glob(f"{self.path}/JPEGImages/480p/{seq}/*.jpg")):
                frame = posixpath.basename(p).rsplit(".", 1)[0]
                gt = f"{self.path}/Annotations/480p/{seq}/{frame}.png"
                recs.append(
                    ImageRecord(f"{seq}/{frame}", self.url(p), self.split, self.url(gt) if self.fs.exists(gt) else None,
                                meta={"sequence": seq, "frame": frame})
                )
        return recs


class BSDSDataset(Dataset):
    kind = "bsds"
    default_split = "test"

    def _list(self) -> list[ImageRecord]:
        img_dir, gt_dir = f"{self.path}/images/{self.split}", f"{self.path}/groundTruth/{self.split}"
        if not self.fs.isdir(img_dir):
            raise DatasetError(f"bsds: {self.url(img_dir)} not found (split={self.split!r})")
        recs = []
        for p in sorted(self.fs.glob(f"{img_dir}/*")):
            stem, _, ext = posixpath.basename(p).rpartition(".")
            if ext.lower() in ("jpg", "jpeg", "png"):
                gt = f"{gt_dir}/{stem}.mat"
                recs.append(ImageRecord(stem, self.url(p), self.split, self.url(gt) if self.fs.exists(gt) else None))
        return recs

    def load_bsds_gt(self, record: ImageRecord) -> list[dict[str, np.ndarray]]:
        """All annotators: ``[{'segmentation': (H,W) int, 'boundaries': (H,W) bool}, ...]``."""
        if not record.gt_path:
            raise DatasetError(f"bsds image {record.image_id!r} has no groundTruth .mat")
        bounds, segs = load_bsds_ground_truth(record.gt_path)
        return [{"segmentation": s, "boundaries": b} for b, s in zip(bounds, segs)]

    def load_gt(self, record: ImageRecord) -> np.ndarray:
        return self.load_bsds_gt(record)[0]["segmentation"]


def load_bsds_ground_truth(path: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(boundaries ``(H,W) bool``, segmentations ``(H,W) int64``) of every annotator in a BSDS
    ``groundTruth/<split>/<id>.mat`` file (local path or fsspec URL)."""
    import scipy.io as sio

    with fsspec.open(str(path), "rb") as f:
        m = sio.loadmat(f, squeeze_me=True, struct_as_record=False)
    gts = np.atleast_1d(m["groundTruth"])
    return [np.asarray(g.Boundaries).astype(bool) for g in gts], [np.asarray(g.Segmentation).astype(np.int64) for g in gts]


DATASETS: dict[str, Callable[..., Dataset]] = {
    c.kind: c for c in (FolderDataset, VOCDataset, ContextDataset, CocoStuffDataset, DavisDataset, BSDSDataset)
}


def open_dataset(kind: str, root: str, split: str | None = None, *, limit: int | None = None) -> Dataset:
    """Open a dataset by kind; unknown kinds raise an error listing the valid ones."""
    try:
        cls = DATASETS[kind]
    except KeyError:
        raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(sorted(DATASETS))}") from None
    return cls(root, split, limit=limit)


def source_signature(path: str) -> str:
    """Cheap change detector for an input file: size + modification time (or ETag on object stores)."""
    try:
        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
    except (FileNotFoundError, OSError):
        return "missing"
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created") or ""
    return f"{info.get('size', '')}-{stamp}"


__all__ = ["ImageRecord", "Dataset", "DatasetError", "DATASETS", "open_dataset", "source_signature", "ImageError"]
