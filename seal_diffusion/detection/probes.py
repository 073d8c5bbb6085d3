"""The function-level test's secret probes and the UNet forwards on them (:mod:`seal_diffusion.detection.functional` holds the
test and explains the method).

Probes (noise latents, timesteps, prompts) come from a seed that is SHA-256 over the key's passports, coin-symmetric,
so only the owner can compute them. The owner's side runs the key's network on them with module l's passport at
M_l + t_l·D_l (f_mid and the central-difference directions); the suspect's side merges a LoRA into the base UNet and
runs the plain forward (the suspect loaded by :mod:`seal_diffusion.formats.suspect_weights`, as a frontend loads it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..defaults import FUNCTIONAL_PROBES
from ..models.conditioning import Conditioning, encode_text
from ..errors import UserError
from ..core.keyfile import SealKey
from ..core.network import network_from_key
from ..formats.suspect_weights import merge_suspect_into, restore

DEFAULT_PROBES = FUNCTIONAL_PROBES  # 12, at half the model's latent size (probe_size)
DEFAULT_H = 1.0
TIMESTEP_RANGE = (50, 950)
GENERIC_PROMPTS = (
    "a photo of a cat", "a photo of a dog", "a landscape with mountains", "a portrait of a person",
    "a city street at night", "a bowl of fruit on a table", "an oil painting of a ship", "a red car",
)


# -- secrets and probes ---------------------------------------------------------------------------------------------
def probe_secret(key: SealKey) -> bytes:
    """SHA-256 over every module's passport pair, each pair in byte order (coin-symmetric); needs C_p, so secret."""
    h = hashlib.sha256(b"seal-functional-probes-v1\0")
    for name in sorted(key.modules):
        mk = key.modules[name]
        pair = sorted([mk.passport.float().contiguous().numpy().tobytes(),
                       mk.passport_p.float().contiguous().numpy().tobytes()])
        h.update(name.encode() + b"\0" + pair[0] + pair[1])
    return h.digest()



def instance_prompt_near(key_path: str | os.PathLike | None) -> str | None:
    """The instance prompt of the model card (``README.md``) beside the key, if there is one."""
    if key_path is None:
        return None
    card = Path(key_path).with_name("README.md")
    if not card.is_file():
        return None
    for line in card.read_text(errors="replace").splitlines()[:30]:
        if line.startswith("instance_prompt:"):
            value = line.partition(":")[2].strip()
            try:
                value = json.loads(value)
            except ValueError:
                pass
            return str(value) or None
    return None


def probe_prompts(instance_prompt: str | None, extra: list[str] | None = None) -> list[str]:
    """The prompt pool: the instance prompt (when known) and ``extra`` first, then generic prompts."""
    first = [p for p in ([instance_prompt] if instance_prompt else []) + list(extra or []) if p]
    return first + [p for p in GENERIC_PROMPTS if p not in first]


def probe_size(unet) -> int:
    """Default probe latent side: half the model's sample size (16 on the tiny default, 32 on SD 1.5, 64 on SDXL).
    A half-size probe costs ~1/6 of a full-size one on tiny (its first attention level sees a quarter of the tokens);
    measured on tiny (docs/verification.md: 6 owners on 4 subjects, releases, distilled copies and innocents), 12
    half-size probes lose little against 8 full-size ones (releases 10.7–14.1 against 12.3–14.1, distilled copies
    12.0–14.1 against 12.6–13.4) at a fifth of the first run's time."""
    cfg = unet.config
    full = int(cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0])
    step = 2 ** (len(cfg.block_out_channels) - 1)
    return max(step, full // 2 // step * step)


def check_probe_size(unet, size: int) -> int:
    step = 2 ** (len(unet.config.block_out_channels) - 1)
    if size < step or size % step:
        raise UserError(f"--probe-size {size}: must be a positive multiple of {step} for this UNet")
    return size


@dataclass
class Probes:
    latents: torch.Tensor  # n × c × h × w
    timesteps: torch.Tensor  # n (int64)
    cond: Conditioning  # the prompts' UNet conditioning (SD 1.x: text states; SDXL: + pooled text, time ids)
    prompts: list[str]  # the prompt of each probe

    @property
    def n(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def make_probes(pipe, key: SealKey, n: int, prompts: list[str], size: int | None = None) -> Probes:
    """``n`` probes from the key's secret: N(0, I) latents (``size``² each; default the model's sample size),
    timesteps in [50, 950], prompts — half the probes use the first prompt of the pool (the instance prompt), the
    rest are drawn from the whole pool."""
    if n < 1:
        raise UserError(f"--probes {n}: need at least 1 probe")
    seed = int.from_bytes(probe_secret(key)[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    size = size or probe_size(pipe.unet)
    latents = torch.randn((n, cfg.in_channels, size, size), generator=gen)
    timesteps = torch.randint(TIMESTEP_RANGE[0], TIMESTEP_RANGE[1] + 1, (n,), generator=gen)
    picks = torch.randint(0, len(prompts), (n,), generator=gen).tolist()
    chosen = [prompts[0] if i % 2 == 0 else prompts[k] for i, k in enumerate(picks)]
    device = next(pipe.text_encoder.parameters()).device
    cache: dict[str, Conditioning] = {}
    cond = Conditioning.cat([cache.setdefault(p, encode_text(pipe, p, device).to("cpu", torch.float32))
                             for p in chosen])
    return Probes(latents, timesteps, cond, chosen)


# -- the owner's side: f_mid and the directions ---------------------------------------------------------------------
def owner_network(unet, key: SealKey):
    """The key's SEAL network (raw A, B; both passports) on ``unet`` — its UNet modules only, a key's text-encoder
    modules are skipped; remove it with ``.remove()``."""
    net = network_from_key(key, unet, text_encoders=False)
    p = next(unet.parameters())
    net.to(p.device)
    return net


def _unet_out(unet, latents, timesteps, cond: Conditioning) -> torch.Tensor:
    p = next(unet.parameters())
    out = unet(latents.to(p.device, p.dtype), timesteps.to(p.device), **cond.to(p.device, p.dtype).unet_kwargs()).sample
    return out.float().cpu()


@torch.no_grad()
def owner_directions(unet, key: SealKey, probes: Probes, h: float = DEFAULT_H, chunk: int = 128,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(f_mid: n × out, G: L × n × out, module names) with the central differences of the module docstring.

    Every probe runs 2L + 1 passport settings (t = 0, +h·e_l, −h·e_l) batched with one t per sample."""
    net = owner_network(unet, key)
    try:
        names = net.module_names
        L = len(names)
        configs = torch.zeros(L, 2 * L + 1)
        for l in range(L):
            configs[l, 1 + l] = h
            configs[l, 1 + L + l] = -h
        p = next(unet.parameters())
        f_mid, dirs = [], []
        for i in range(probes.n):
            outs = []
            for s in range(0, 2 * L + 1, chunk):
                t = configs[:, s:s + chunk]
                net.set_interp(t.to(p.device, p.dtype))
                k = t.shape[1]
                outs.append(_unet_out(unet, probes.latents[i:i + 1].expand(k, -1, -1, -1),
                                      probes.timesteps[i:i + 1].expand(k), probes.cond.index(slice(i, i + 1)).expand(k)))
            out = torch.cat(outs)
            f_mid.append(out[0])
            dirs.append((out[1:1 + L] - out[1 + L:]) / (2 * h))
            if progress:
                progress(i + 1, probes.n)
        return torch.stack(f_mid), torch.stack(dirs, 1), names
    finally:
        net.remove()



# -- the suspect's side ---------------------------------------------------------------------------------------------
def merge_lora_into(unet, path, strengths=None) -> dict[str, torch.Tensor]:
    """Load LoRA file(s) into ``unet`` as a frontend does — every layout the weight test reads, conv layers, alpha,
    strengths (:mod:`seal_diffusion.formats.suspect_weights`); returns the original tensors for :func:`restore_weights`."""
    return merge_suspect_into(unet, path, strengths)[0]


def restore_weights(unet, originals: dict[str, torch.Tensor]) -> None:
    restore(unet, originals)


@torch.no_grad()
def suspect_outputs(unet, probes: Probes, chunk: int = 16) -> torch.Tensor:
    """The suspect UNet's noise predictions on the probes (n × out)."""
    return torch.cat([_unet_out(unet, probes.latents[s:s + chunk], probes.timesteps[s:s + chunk],
                                probes.cond.index(slice(s, s + chunk))) for s in range(0, probes.n, chunk)])

