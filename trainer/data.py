"""Training data from the caches: image + UCM superpixels + CLIP features → two augmented views.

Nothing loads a dataset into memory: each item reads its image file and its two cached arrays (one byte range
of one Zarr shard each). The order of samples and every augmentation seed are functions of (seed, step), so
a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from clips4.pipeline.cache import StageReader
from clips4.pipeline.images import load_rgb
from clips4.trainer.augment import AugmentConfig, collate_views, make_views
from clips4.trainer.regions import paste_box, paste_regions


class CachedViews(Dataset):
    """Items are ``(index, aug_seed)`` pairs (from ``StepSampler``); each yields ``make_views(...)`` output.

    ``segments_url`` / ``clip_url``: committed stage outputs. Only images finished in both (and, where given, in
    ``image_ids``: the config's selection) are used.
    Readers are opened lazily in each DataLoader worker (Zarr handles are not shared across processes).
    """

    def __init__(self, segments_url: str, clip_url: str, *, crop_size: int, stride: int = 8,
                 augment: AugmentConfig | None = None, cache_images: int = 0, image_ids=None):
        self.segments_url, self.clip_url = segments_url, clip_url
        seg, clip = StageReader(segments_url), StageReader(clip_url)
        ids = sorted(set(seg.image_ids) & set(clip.image_ids) & (set(image_ids) if image_ids is not None else set(seg.image_ids)))
        if not ids:
            raise ValueError(f"no image is finished in both {segments_url} and {clip_url}")
        self.image_ids = ids
        # from the index columns at once (one row lookup per image would be ~0.1 ms x N at start-up)
        from clips4.pipeline.names import from_stored  # ids and paths that are not UTF-8 are stored escaped

        every = dict(zip(map(from_stored, seg.index["image_id"].to_pylist()), map(from_stored, seg.index["path"].to_pylist())))
        self.paths = {i: every[i] for i in ids}
        self.embed_dim = int(clip.get(ids[0], "features").shape[-1])
        self.aug = AugmentConfig(**{**(augment.__dict__ if augment else {}), "size": crop_size, "stride": stride})
        self.variants = self.aug.photometric == "teacher"
        if self.variants and "variant_features__shape" not in clip.row(ids[0]):
            raise ValueError(f"train.augment.photometric=teacher needs the teacher's photometric variants in {clip_url}: "
                             "set clip_features.photometric_variants > 0")
        self._readers: tuple[StageReader, StageReader] | None = None
        #: up to this many images' decoded inputs kept in memory per worker (small datasets: no re-reads)
        self.cache_images = int(cache_images)
        self._memo: dict = {}

    def __len__(self) -> int:
        return len(self.image_ids)

    def _open(self) -> tuple[StageReader, StageReader]:
        if self._readers is None:
            self._readers = (StageReader(self.segments_url), StageReader(self.clip_url))
        return self._readers

    def __getitem__(self, item: tuple[int, int]) -> list[dict]:
        index, seed = item
        image_id = self.image_ids[index]
        inputs = self._memo.get(image_id) or self._read(image_id)
        if self.cache_images and len(self._memo) < self.cache_images:
            self._memo[image_id] = inputs
        image, labels, feats, var, ops = inputs
        # mixing (a function of the view seed: resumed runs see the same); not with the teacher's variants, whose
        # target is the teacher on the whole variant image
        if var is None and len(self.image_ids) > 1:
            for p, key, paste in ((self.aug.paste_p, 7, paste_regions),
                                  (self.aug.cutmix_p, 13, lambda a, b, r: paste_box(a, b, r, self.aug.cutmix_area))):
                rng = np.random.default_rng([seed, key])
                if p > 0 and rng.random() < p:
                    j = (index + 1 + int(rng.integers(len(self.image_ids) - 1))) % len(self.image_ids)
                    other = self._memo.get(self.image_ids[j]) or self._read(self.image_ids[j])
                    image, labels, feats = paste((image, labels, feats), other[:3], rng)
        return make_views(image, labels, feats, rng=seed, cfg=self.aug, variants=var, variant_ops=ops)

    def _read(self, image_id: str) -> tuple:
        seg, clip = self._open()
        image = load_rgb(self.paths[image_id])
        labels = seg.get(image_id, "labels")
        feats = clip.get(image_id, "features")
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{image_id}: cached labels {labels.shape} do not match the image {image.shape[:2]}")
        var = ops = None
        if self.variants:
            var = np.moveaxis(clip.get(image_id, "variant_features"), 2, 0)  # (V,h,w,D)
            ops = clip.get(image_id, "variant_ops")
        return image, labels, feats, var, ops

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = None
        state["_memo"] = {}
        return state


class StepSampler(Sampler):
    """Batches for steps ``start..total-1``: an epoch-wise permutation seeded by (seed, epoch), split over ranks.

    Step ``t`` consumes the permutation positions ``[t*B*W, (t+1)*B*W)`` (``B`` = per-rank batch, ``W`` = ranks);
    rank ``r`` reads its own ``B`` of them, slots ``r*B .. r*B+B-1`` of the global batch. Each element is
    ``(index, aug_seed)`` with ``aug_seed`` a function of (seed, step, global slot) only, so the batch at step t
    never depends on where a run started, and ``W`` ranks of batch ``B`` see exactly the images and views that
    one process of batch ``B*W`` sees.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed, self.start, self.total, self.rank, self.world = n, batch_size, seed, start, total, rank, world

    def _perm(self, epoch: int) -> np.ndarray:
        if getattr(self, "_cached", (None,))[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cached[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        per_step = self.bs * self.world
        out = []
        for slot in range(self.bs):
            k = step * per_step + self.rank * self.bs + slot
            epoch, pos = divmod(k, self.n)
            # [.., global slot, 0]: for one process this is the (seed, step, slot, rank=0) key used so far
            seed = int(np.random.default_rng([self.seed, step, self.rank * self.bs + slot, 0]).integers(2**31))
            out.append((int(self._perm(epoch)[pos]), seed))
        return out

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.total - self.start)


def collate(items: list[list[dict]]) -> dict:
    return collate_views(items)


def make_loader(ds: CachedViews, sampler: StepSampler, num_workers: int, pin_memory: bool,
                generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    # ``generator`` seeds the workers without drawing from the global RNG (resumed runs stay identical)
    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None, generator=generator,
    )
