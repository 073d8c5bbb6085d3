"""The owner's private cache of the function-level test: probes, f_mid and directions, computed once per (key, base
model, probe settings) and kept beside the key (safetensors, mode 0600), bound to the key's commitment and a SHA-256 of
the base UNet's weights; a cache that does not match is recomputed (:mod:`seal_diffusion.detection.functional` runs the test).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from ..models.base_model import config_from_base, load_pipeline
from ..models.conditioning import Conditioning
from ..errors import UserError
from ..fileio import atomic_write, load_safetensors
from ..core.keyfile import SealKey
from .probes import (DEFAULT_H, DEFAULT_PROBES, TIMESTEP_RANGE, Probes, check_probe_size, instance_prompt_near,
                     make_probes, owner_directions, probe_prompts, probe_size)

CACHE_FORMAT = "sealkey-functional"
CACHE_VERSION = "1"


def base_fingerprint(unet: torch.nn.Module) -> str:
    """SHA-256 over the base UNet's weights (name, shape, dtype, bytes): the cache is valid for this base only."""
    h = hashlib.sha256(b"seal-base-unet-v1\0")
    for name, t in unet.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():  # the tensor's own memory, not a copy (SD 1.5's UNet: 1.7–1.8 s instead of 2.7–3.0 s)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class OwnerCache:
    probes: Probes
    f_mid: torch.Tensor  # n × out
    directions: torch.Tensor  # L × n × out
    modules: list[str]
    h: float
    commitment: str
    base: str  # base fingerprint

    @property
    def n_modules(self) -> int:
        return len(self.modules)


def cache_path(key_path: str | os.PathLike, base_fp: str) -> Path:
    """``NAME.sealkey`` → ``NAME.sealkey.functional-<base fingerprint[:12]>.safetensors`` (private, beside it)."""
    key_path = Path(key_path)
    return key_path.with_name(f"{key_path.name}.functional-{base_fp[:12]}.safetensors")


def _settings(n: int, prompts: list[str], h: float, size: int) -> str:
    return json.dumps({"n": n, "prompts": prompts, "h": h, "t": list(TIMESTEP_RANGE), "size": size})


def save_cache(cache: OwnerCache, path: str | os.PathLike, settings: str) -> Path:
    """Write atomically with mode 0600 (set on the temp file before the rename)."""
    cond = cache.probes.cond
    tensors = {"latents": cache.probes.latents, "timesteps": cache.probes.timesteps, "hidden": cond.encoder_hidden_states,
               "f_mid": cache.f_mid, "directions": cache.directions}
    if cond.text_embeds is not None:  # SDXL
        tensors.update(text_embeds=cond.text_embeds, time_ids=cond.time_ids)
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "commitment": cache.commitment, "base": cache.base,
            "settings": settings, "modules": json.dumps(cache.modules),
            "probe_prompts": json.dumps(cache.probes.prompts),
            "h": repr(cache.h)}
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_write(path, what="functional cache", private=True) as tmp:  # 0600, like the key
        tmp.write_bytes(data)
    return Path(path)


def load_cache(path: str | os.PathLike, commitment: str, base_fp: str, settings: str) -> OwnerCache | None:
    """The cache at ``path`` if it exists and is bound to this key, base and settings; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        t, meta = load_safetensors(path, what="functional cache")
    except UserError:
        return None
    if (meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION
            or meta.get("commitment") != commitment or meta.get("base") != base_fp or meta.get("settings") != settings):
        return None
    try:
        cond = Conditioning(t["hidden"], t.get("text_embeds"), t.get("time_ids"))
        probes = Probes(t["latents"], t["timesteps"], cond, json.loads(meta["probe_prompts"]))
        return OwnerCache(probes, t["f_mid"], t["directions"], json.loads(meta["modules"]), float(meta["h"]),
                          commitment, base_fp)
    except (KeyError, ValueError):
        return None


def cached(key: SealKey, unet, key_path, *, n_probes: int = DEFAULT_PROBES, prompts: list[str] | None = None,
           h: float = DEFAULT_H, base_fp: str | None = None, size: int | None = None) -> OwnerCache | None:
    """The private cache beside ``key_path`` if it matches (key, base UNet, settings) — needs only the UNet."""
    if key_path is None:
        return None
    prompts = prompts or probe_prompts(instance_prompt_near(key_path))
    base_fp = base_fp or base_fingerprint(unet)
    size = check_probe_size(unet, size or probe_size(unet))
    return load_cache(cache_path(key_path, base_fp), key.commitment(), base_fp, _settings(n_probes, prompts, h, size))


def load_unet(base: str, config=None):
    """Only the base UNet (no text encoder, no transformers import) for a tiny/tiny-xl/folder base; else the
    pipeline's (which also explains what is wrong with an unusual folder)."""
    location = config_from_base(base)
    if location is not None:
        from diffusers import UNet2DConditionModel  # lazy: diffusers is heavy, and the command line starts without it

        with contextlib.suppress(Exception):  # an unusual folder: the full loader below says what is wrong
            return UNet2DConditionModel.from_pretrained(location, subfolder="unet", local_files_only=True)
    return load_pipeline(base, config=config).unet


def owner_cache(key: SealKey, pipe, *, key_path=None, n_probes: int = DEFAULT_PROBES, prompts: list[str] | None = None,
                h: float = DEFAULT_H, base_fp: str | None = None, use_cache: bool = True, progress=None,
                size: int | None = None) -> OwnerCache:
    """The owner's probes, f_mid and directions: from the private cache beside ``key_path`` when it matches, else
    computed (and cached when ``key_path`` is given and ``use_cache``)."""
    prompts = prompts or probe_prompts(instance_prompt_near(key_path))
    base_fp = base_fp or base_fingerprint(pipe.unet)
    commitment = key.commitment()
    size = check_probe_size(pipe.unet, size or probe_size(pipe.unet))
    settings = _settings(n_probes, prompts, h, size)
    path = cache_path(key_path, base_fp) if key_path is not None else None
    if path is not None and use_cache:
        cached = load_cache(path, commitment, base_fp, settings)
        if cached is not None:
            return cached
    probes = make_probes(pipe, key, n_probes, prompts, size)
    f_mid, dirs, names = owner_directions(pipe.unet, key, probes, h, progress=progress)
    cache = OwnerCache(probes, f_mid, dirs, names, h, commitment, base_fp)
    if path is not None and use_cache:
        save_cache(cache, path, settings)
    return cache

