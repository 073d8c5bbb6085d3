"""The image check's differentiable sampler: a challenge rendered as ``StableDiffusionPipeline`` renders it but with
gradients, the key's passports on the line M + t·D (:class:`PassportLine`), the owner's midpoint images, and every
module's directional statistic from one backward pass (:mod:`seal_diffusion.image_check` runs the test).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .image_challenge import Challenge
from .keyfile import SealKey
from .lora_names import unet_modules
from .network import network_from_key

Progress = Callable[[int, int, str], object]


def use_scheduler(pipe, name: str) -> None:
    import diffusers  # lazy: diffusers is heavy, and the command line starts without it

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise UserError(f"challenge scheduler {name!r}: not a diffusers scheduler class")
    if type(pipe.scheduler).__name__ != name:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


def sample(pipe, challenge: Challenge, index: Sequence[int]) -> torch.Tensor:
    """The challenge entries ``index`` as ``StableDiffusionPipeline`` renders them — same noise (one CPU generator per
    image), scheduler, CFG and decoding — but differentiable (no ``no_grad``): (k, 3, H, W) in [0, 1]."""
    from diffusers.utils.torch_utils import randn_tensor  # lazy: diffusers is heavy (see use_scheduler)

    use_scheduler(pipe, challenge.scheduler)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    prompts = [challenge.prompts[i] for i in index]
    gens = [torch.Generator(device="cpu").manual_seed(int(challenge.seeds[i])) for i in index]
    cfg = challenge.guidance_scale > 1.0
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg)
    embeds = torch.cat([uncond, cond]) if cfg else cond
    shape = (len(prompts), pipe.unet.config.in_channels, challenge.height // pipe.vae_scale_factor,
             challenge.width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=gens, device=device, dtype=dtype) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(challenge.steps, device=device)
    for t in pipe.scheduler.timesteps:
        inp = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        noise = pipe.unet(inp, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if cfg:
            n_uncond, n_cond = noise.chunk(2)
            noise = n_uncond + challenge.guidance_scale * (n_cond - n_uncond)
        latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_compare_space(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, H, W) → (n, 3, size, size) by area averaging."""
    return F.interpolate(images, size=(size, size), mode="area")


class PassportLine:
    """The key's SEAL layers on ``pipe.unet`` with module l's passport at M_l + t_l·D_l (``t`` a leaf vector, so
    autograd gives ∂/∂t_l). Use as a context manager; the UNet is exactly the base again afterwards."""

    def __init__(self, pipe, key: SealKey):
        self.pipe, self.key, self.names = pipe, key, unet_modules(key.modules)  # text-encoder layers: not probed
        self.mid = {n: (m.passport + m.passport_p) / 2 for n, m in key.modules.items()}
        self.half = {n: (m.passport - m.passport_p) / 2 for n, m in key.modules.items()}

    def __enter__(self) -> "PassportLine":
        self.net = network_from_key(self.key, self.pipe, text_encoders=False)
        self.net.set_passport("C")
        self.set(torch.zeros(len(self.names)))
        return self

    def set(self, t: torch.Tensor) -> None:
        for i, n in enumerate(self.names):
            self.net[n].passport = self.mid[n] + t[i] * self.half[n]

    def __exit__(self, *exc) -> None:
        self.net.remove()


def render_midpoint(pipe, key: SealKey, challenge: Challenge, batch_size: int = 8,
                    progress: Progress | None = None) -> torch.Tensor:
    """x_mid: every module at M = (C + C_p)/2, in compare space (n, 3, S, S). Independent of the release coins."""
    out = []
    with PassportLine(pipe, key), torch.no_grad():
        for start in range(0, challenge.n, batch_size):
            idx = list(range(start, min(start + batch_size, challenge.n)))
            out.append(to_compare_space(sample(pipe, challenge, idx), challenge.compare_size))
            if progress:
                progress(idx[-1] + 1, challenge.n, "owner's reference images")
    return torch.cat(out)


def directional_statistics(pipe, key: SealKey, challenge: Challenge, residual: torch.Tensor, index: Sequence[int],
                           batch_size: int = 4, progress: Progress | None = None) -> np.ndarray:
    """d_l = ⟨r, ∂x/∂t_l⟩ at t = 0 for every module at once: one backward pass per batch of images (the images are
    independent, so the sum over batches is exact and memory stays bounded)."""
    grad = torch.zeros(len(unet_modules(key.modules)), dtype=torch.float64)
    with PassportLine(pipe, key) as line:
        for start in range(0, len(index), batch_size):
            rows = list(range(start, min(start + batch_size, len(index))))
            t = torch.zeros(len(line.names), requires_grad=True)
            line.set(t)
            with torch.enable_grad():
                x = to_compare_space(sample(pipe, challenge, [index[i] for i in rows]), challenge.compare_size)
                (x * residual[rows].to(x.dtype)).sum().backward()
            grad += t.grad.double()
            if progress:
                progress(rows[-1] + 1, len(index), "testing the images against each module's direction")
        line.set(torch.zeros(len(line.names)))
    return grad.numpy()

