"""Held-out evaluation: the denoising loss of a UNet (with a passport, without, or bare) on fixed images, noise and
timesteps — and the small model pieces it shares with training (the noise scheduler and target). Prompts are encoded
by :func:`seal_diffusion.models.conditioning.encode_text` (SD 1.x and SDXL alike).

Training, the claim check, the demo, compare and the robustness matrix all import these from here: this module sits
below all of them and imports none of them.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..models.conditioning import Conditioning, encode_text
from ..errors import UserError
from ..models.images import image_to_tensor, load_image, scan_image_dir
from ..models.tiny import SD15_SCHEDULER


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * vae_scale_factor(pipe.vae)


def training_noise_scheduler(pipe):
    """The DDPM scheduler the base model was trained with (the noise schedule of training and held-out loss)."""
    from diffusers import DDPMScheduler  # lazy: diffusers takes ~5 s to import; the CLI imports this module at start

    return DDPMScheduler.from_config(pipe.scheduler.config)


def denoising_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v_prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"base model: unsupported prediction_type {kind!r} (expected epsilon or v_prediction)")


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means of ``pixels`` (N×3×H×W in [−1, 1]) times the VAE scaling factor: deterministic latents."""
    p = next(vae.parameters())
    mean = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean
    return mean.float() * vae.config.scaling_factor


@torch.no_grad()
def heldout_batch(pipe, image_dir: str | os.PathLike, prompt: str, resolution: int | None = None):
    """``(latents, conditioning)`` of the (center-cropped) images in ``image_dir`` with ``prompt``."""
    resolution = resolution or default_resolution(pipe)
    files = scan_image_dir(image_dir, "images", warn=lambda m: None)
    pixels = torch.stack([image_to_tensor(load_image(f, resolution, lambda m: None), resolution, True, False, None)
                          for f in files])
    device = next(pipe.unet.parameters()).device
    return encode_images(pipe.vae, pixels), encode_text(pipe, prompt, device, size=resolution)


@torch.no_grad()
def heldout_denoising_loss(
    unet,
    network,
    latents: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    mode: str = "C",
    seed: int = 0,
    n_timesteps: int = 8,
    noise_scheduler=None,
) -> float:
    """Mean denoising MSE on ``latents`` with FIXED noise and timesteps, with the network's passport set to ``mode``.

    ``mode`` ∈ {C, C_p, identity, off} (``network=None`` means the bare UNet, i.e. ``off``). The timesteps are
    ``n_timesteps`` evenly spaced over the schedule (5 %…95 %) and the noise is drawn from ``seed``, so two calls
    with different modes see exactly the same inputs: the differences are the passport's doing. ``cond`` is the
    prompt's :class:`~seal_diffusion.models.conditioning.Conditioning` (a bare hidden-states tensor is accepted for SD 1.x).
    """
    if noise_scheduler is None:
        from diffusers import DDPMScheduler  # lazy, as in training_noise_scheduler

        noise_scheduler = DDPMScheduler(**{k: SD15_SCHEDULER[k] for k in
                                           ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    if network is None and mode != "off":
        raise ValueError(f"mode {mode!r} needs a network")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    total_steps = noise_scheduler.config.num_train_timesteps
    steps = torch.linspace(0.05 * (total_steps - 1), 0.95 * (total_steps - 1), n_timesteps).round().long()
    gen = torch.Generator().manual_seed(seed)
    latents = latents.float()
    n = latents.shape[0]
    cond = (cond if isinstance(cond, Conditioning) else Conditioning(cond)).expand(n).to(device, dtype)
    was_training = unet.training
    unet.eval()
    losses = []
    try:
        ctx = network.passport(mode) if network is not None else contextlib.nullcontext()
        with ctx:
            for t in steps:
                noise = torch.randn(latents.shape, generator=gen)
                timesteps = torch.full((n,), int(t), dtype=torch.long)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = denoising_target(noise_scheduler, latents, noise, timesteps)
                pred = unet(noisy.to(device, dtype), timesteps.to(device), **cond.unet_kwargs(), return_dict=False)[0]
                losses.append(F.mse_loss(pred.float().cpu(), target.float()).item())
    finally:
        unet.train(was_training)
    return float(np.mean(losses))

