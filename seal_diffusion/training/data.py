"""The trainer's data: the DreamBooth dataset (instance and class images), its reproducible sampler and collate.

Every random draw (data order, crop, flip) comes from a generator seeded by (seed, purpose, epoch, index), never
from the global RNG, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..models.images import image_to_tensor, load_image
from .args import warn

MAX_CACHED_IMAGES = 1000  # keep decoded, resized images in memory up to this many


def derived_seed(seed: int, *parts) -> int:
    digest = hashlib.sha256(repr(("seal-diffusion-train", int(seed)) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, *parts) -> torch.Generator:
    """A CPU generator for one purpose (e.g. ``("noise", epoch, batch, process)``) of one run."""
    return torch.Generator().manual_seed(derived_seed(seed, *parts))



class ImageSet:
    """Images of one folder, decoded and resized once (kept in memory for DreamBooth-sized sets).

    Unreadable files (truncated, corrupt) are skipped with one warning that lists them; only a folder with no
    readable image left is an error (``arg`` names it)."""

    def __init__(self, files: list[Path], resolution: int, warn: Callable[[str], None] = warn, arg: str = "images",
                 resample=None):
        self.resolution = resolution
        self.resample = resample  # PIL filter of the resize (--image_interpolation_mode); None: bilinear
        self.warn = warn
        self._cache: dict[int, object] = {}
        keep = len(files) <= MAX_CACHED_IMAGES
        good, bad = [], []
        for f in files:  # decode everything now: a corrupt file is found before any training
            try:
                im = self._load(f)
            except UserError as exc:
                bad.append((f, exc))
                continue
            if keep:
                self._cache[len(good)] = im
            good.append(f)
        if not good:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(f"{arg}: no readable image left; {bad[0][1]}{more}")
        if bad:
            shown = ", ".join(f.name for f, _ in bad[:8]) + (", …" if len(bad) > 8 else "")
            warn(f"{arg}: skipping {len(bad)} unreadable image(s): {shown}")
        self.files = good

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int):
        return self._cache[i] if i in self._cache else self._load(self.files[i])

    def _load(self, path: Path):
        if self.resample is None:
            return load_image(path, self.resolution, self.warn)
        return load_image(path, self.resolution, self.warn, resample=self.resample)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch): the order of every epoch is reproducible, also on resume.

    Yields ``(epoch, index)`` so the dataset can seed each sample's augmentation. The epoch is set with
    :meth:`use_epoch` (not ``set_epoch``, which accelerate's loaders call with their own counter).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=generator_for(self.seed, "order", self.epoch)).tolist()
        return iter([(self.epoch, i) for i in order])


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance (and class) samples; pixels in [−1, 1], or cached VAE moments when ``latent_cache`` is set.

    Like diffusers' DreamBoothDataset the length is max(#instance, #class) and sample i pairs instance i mod n with
    class i mod m. Augmentation (random crop, flip) is seeded by (seed, epoch, i).
    """

    def __init__(self, instance: ImageSet, class_set: ImageSet | None, resolution: int, center_crop: bool,
                 random_flip: bool, seed: int):
        self.instance, self.class_set = instance, class_set
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.latent_cache: dict[str, list[list[torch.Tensor]]] | None = None  # kind → [image][flip] → moments

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_set) if self.class_set is not None else 0)

    def _sample(self, kind: str, images: ImageSet, i: int, rng: np.random.Generator) -> torch.Tensor:
        flip = bool(self.random_flip and rng.random() < 0.5)
        if self.latent_cache is not None:
            return self.latent_cache[kind][i][int(flip)]
        return image_to_tensor(images.image(i), self.resolution, self.center_crop, flip, rng)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = np.random.Generator(np.random.PCG64(derived_seed(self.seed, "augment", epoch, i)))
        item = {"instance": self._sample("instance", self.instance, i % len(self.instance), rng)}
        if self.class_set is not None:
            item["class"] = self._sample("class", self.class_set, i % len(self.class_set), rng)
        return item

    @torch.no_grad()
    def cache_latents(self, vae, device, dtype) -> None:
        """Encode every image once (center crop; unflipped and flipped) and keep the VAE moments on the CPU."""
        cache = {}
        for kind, images in (("instance", self.instance), ("class", self.class_set)):
            if images is None:
                continue
            rows = []
            for i in range(len(images)):
                flips = (False, True) if self.random_flip else (False,)
                px = torch.stack([image_to_tensor(images.image(i), self.resolution, True, f, None) for f in flips])
                moments = vae.encode(px.to(device, dtype)).latent_dist.parameters.float().cpu()
                rows.append(list(moments) if self.random_flip else [moments[0], moments[0]])
            cache[kind] = rows
        self.latent_cache = cache


def collate(items: list[dict]) -> dict:
    out = {"instance": torch.stack([x["instance"] for x in items])}
    if "class" in items[0]:
        out["class"] = torch.stack([x["class"] for x in items])
    return out
