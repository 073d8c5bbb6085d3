"""The image check's differentiable sampler: a challenge rendered as ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline`` renders it but with gradients, the key's passports on the line M + t·D
(:class:`PassportLine`), the owner's midpoint images, and every image's directional statistic for every module from one
backward pass (:mod:`seal_diffusion.detection.image_check` combines them and runs the test).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.base_model import is_sdxl
from ..models.conditioning import Conditioning
from ..errors import UserError
from .image_challenge import Challenge
from ..core.keyfile import SealKey
from ..formats.lora_names import unet_modules
from ..core.network import network_from_key

Progress = Callable[[int, int, str], object]


def use_scheduler(pipe, name: str) -> None:
    """Give ``pipe`` the diffusers scheduler class ``name`` (same config); it stays. See :func:`challenge_scheduler`."""
    import diffusers  # lazy: diffusers is heavy, and the command line starts without it

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise UserError(f"challenge scheduler {name!r}: not a diffusers scheduler class")
    if type(pipe.scheduler).__name__ != name:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


@contextlib.contextmanager
def challenge_scheduler(pipe, name: str):
    """``pipe`` with the scheduler class ``name`` inside the block, its own scheduler again after it: a pipeline the
    caller shares (the app's, a test's) renders as before once the image check is done with it."""
    own = pipe.scheduler
    use_scheduler(pipe, name)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = own


def challenge_conditioning(pipe, prompts: list[str], height: int, width: int, cfg: bool) -> Conditioning:
    """The UNet conditioning ``pipe.__call__`` builds for ``prompts`` at height × width, CFG rows first when ``cfg``.

    SD 1.x: the text hidden states. SDXL (as ``StableDiffusionXLPipeline.__call__``): both encoders' hidden states,
    the pooled ``text_embeds`` and the time ids original size (H, W) + crop (0, 0) + target size (H, W), made by the
    pipeline's own ``_get_add_time_ids`` with text_encoder_2's projection dim (which checks them against the UNet)."""
    device = pipe.unet.device
    with torch.no_grad():
        if not is_sdxl(pipe):
            cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg)
            return Conditioning(torch.cat([uncond, cond]) if cfg else cond)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=cfg)
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                 text_encoder_projection_dim=proj).to(device)
    out = Conditioning(embeds, pooled, ids.expand(len(prompts), -1))
    return Conditioning.cat([Conditioning(neg, neg_pooled, out.time_ids), out]) if cfg else out


def sample(pipe, challenge: Challenge, index: Sequence[int]) -> torch.Tensor:
    """The challenge entries ``index`` as ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` render them —
    same noise (one CPU generator per image), conditioning, scheduler, CFG and decoding — but differentiable (no
    ``no_grad``): (k, 3, H, W) in [0, 1]. ``pipe`` keeps its own scheduler."""
    with challenge_scheduler(pipe, challenge.scheduler):
        return _sample(pipe, challenge, index)


def _sample(pipe, challenge: Challenge, index: Sequence[int]) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor  # lazy: diffusers is heavy (see use_scheduler)

    device, dtype = pipe.unet.device, pipe.unet.dtype
    prompts = [challenge.prompts[i] for i in index]
    gens = [torch.Generator(device="cpu").manual_seed(int(challenge.seeds[i])) for i in index]
    cfg = challenge.guidance_scale > 1.0
    unet_kwargs = challenge_conditioning(pipe, prompts, challenge.height, challenge.width, cfg).unet_kwargs()
    shape = (len(prompts), pipe.unet.config.in_channels, challenge.height // pipe.vae_scale_factor,
             challenge.width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=gens, device=device, dtype=dtype) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(challenge.steps, device=device)
    for t in pipe.scheduler.timesteps:
        inp = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        noise = pipe.unet(inp, t, **unet_kwargs, return_dict=False)[0]
        if cfg:
            n_uncond, n_cond = noise.chunk(2)
            noise = n_uncond + challenge.guidance_scale * (n_cond - n_uncond)
        latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
    vae = pipe.vae.config  # a VAE with latents_mean/std is unscaled as StableDiffusionXLPipeline does; else / scale
    if getattr(vae, "latents_mean", None) is not None and getattr(vae, "latents_std", None) is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents) for v in (vae.latents_mean, vae.latents_std))
        latents = latents * std / vae.scaling_factor + mean
    else:
        latents = latents / vae.scaling_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_compare_space(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, H, W) → (n, 3, size, size) by area averaging."""
    return F.interpolate(images, size=(size, size), mode="area")


class PassportLine:
    """The key's SEAL layers on ``pipe.unet`` with module l's passport at M_l + t_l·D_l (``t`` a leaf, so autograd
    gives ∂/∂t_l; :meth:`SealNetwork.set_interp`). Use as a context manager; the UNet is exactly the base again
    afterwards."""

    def __init__(self, pipe, key: SealKey):
        self.pipe, self.key, self.names = pipe, key, unet_modules(key.modules)  # text-encoder layers: not probed

    def __enter__(self) -> "PassportLine":
        self.net = network_from_key(self.key, self.pipe, text_encoders=False)
        # t is indexed like self.names (the key's order, which the reports name); the network's own order may differ
        self._order = torch.tensor([self.names.index(n) for n in self.net.module_names])
        self.set(torch.zeros(len(self.names)))
        return self

    def set(self, t: torch.Tensor, cfg: bool = False) -> None:
        """``t``: one value per module (L), or one per module and image (L × images): image i then runs with
        M_l + t[l, i]·D_l, so one backward pass gives every image's own ∂x_i/∂t_l. ``cfg``: the UNet batch runs
        every image twice (unconditional rows first), as :func:`sample` does with guidance."""
        t = t[self._order]
        self.net.set_interp(torch.cat([t, t], 1) if cfg and t.dim() == 2 else t)

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


def render_release(pipe, key: SealKey, challenge: Challenge, batch_size: int = 8,
                   progress: Progress | None = None) -> torch.Tensor:
    """The challenge as the owner's release renders it (released passports C), rounded to 8 bits like a saved PNG,
    in compare space (n, 3, S, S): the self-test's suspect."""
    out = []
    with PassportLine(pipe, key) as line, torch.no_grad():
        line.set(torch.ones(len(line.names)))  # M + D = C, the released passport
        for start in range(0, challenge.n, batch_size):
            idx = list(range(start, min(start + batch_size, challenge.n)))
            out.append(to_compare_space(torch.round(sample(pipe, challenge, idx) * 255) / 255, challenge.compare_size))
            if progress:
                progress(idx[-1] + 1, challenge.n, "your release's images (self-test)")
    return torch.cat(out)


def directional_statistics(pipe, key: SealKey, challenge: Challenge, residual: torch.Tensor, index: Sequence[int],
                           batch_size: int = 8, progress: Progress | None = None) -> np.ndarray:
    """Per image i and module l, D[i, l] = ⟨r_i, ∂x_i/∂t_l⟩ at t = 0, every image and module from one backward pass
    per batch of images (each image has its own t, :meth:`PassportLine.set`; the images are independent, so the
    batches are exact and memory stays bounded). ``residual``: (n, 3, S, S) → (n, L), or several residuals
    (k, n, 3, S, S) → (k, n, L) from one forward pass per batch (one backward each)."""
    many = residual.dim() == 5
    residuals = residual if many else residual.unsqueeze(0)
    n_mod = len(unet_modules(key.modules))
    out = torch.zeros(residuals.shape[0], len(index), n_mod, dtype=torch.float64)
    with PassportLine(pipe, key) as line:
        for start in range(0, len(index), batch_size):
            rows = list(range(start, min(start + batch_size, len(index))))
            t = torch.zeros(n_mod, len(rows), requires_grad=True)
            line.set(t, cfg=challenge.guidance_scale > 1.0)
            with torch.enable_grad():
                x = to_compare_space(sample(pipe, challenge, [index[i] for i in rows]), challenge.compare_size)
                for k in range(residuals.shape[0]):
                    (g,) = torch.autograd.grad((x * residuals[k, rows].to(x.dtype)).sum(), t,
                                               retain_graph=k + 1 < residuals.shape[0])
                    out[k, rows] = g.T.double()
            if progress:
                progress(rows[-1] + 1, len(index), "testing the images against each module's direction")
    return out.numpy() if many else out[0].numpy()


def midpoint_and_statistics(pipe, key: SealKey, challenge: Challenge, suspect: torch.Tensor, batch_size: int = 8,
                            progress: Progress | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """(x_mid, D) for a suspect of every challenge entry (compare space) in one pass, D as
    :func:`directional_statistics` gives it (n, L): the forward at t = 0 that the statistics need *is* x_mid, so the
    owner's reference costs no render of its own."""
    n_mod = len(unet_modules(key.modules))
    mids, out = [], torch.zeros(challenge.n, n_mod, dtype=torch.float64)
    with PassportLine(pipe, key) as line:
        for start in range(0, challenge.n, batch_size):
            rows = list(range(start, min(start + batch_size, challenge.n)))
            t = torch.zeros(n_mod, len(rows), requires_grad=True)
            line.set(t, cfg=challenge.guidance_scale > 1.0)
            with torch.enable_grad():
                x = to_compare_space(sample(pipe, challenge, rows), challenge.compare_size)
                mids.append(x.detach().float())
                (x * (suspect[rows].to(x.dtype) - x.detach())).sum().backward()
            out[rows] = t.grad.T.double()
            if progress:
                progress(rows[-1] + 1, challenge.n, "owner's reference and self-test")
    return torch.cat(mids), out.numpy()
