"""The DreamBooth loss of one micro-batch, with the passport schedule: ``alternate`` switches C ↔ C_p every
optimizer step; ``split`` runs the first part of every batch with C and the rest with C_p. The schedule depends only
on the global step, so all accelerate processes stay in lock-step. With ``--train_text_encoder`` the prompts go through
the adapted text encoder(s) every step (:class:`TextEncoding`), under the same passport as the UNet."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.conditioning import Conditioning, encode_text
from ..evaluation.heldout import denoising_target


def sample_latents(moments: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
    """Sample the VAE posterior from its moments (mean ‖ logvar) with ``generator``; times the VAE scaling factor."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * eps) * scaling


def _split_count(n: int, step: int) -> int:
    """Samples of a batch of ``n`` that use C under the split schedule (an odd one alternates with the step)."""
    return n // 2 + (n % 2 if step % 2 == 0 else 0)


def _arrange(inst: torch.Tensor, cls: torch.Tensor | None, k_inst: int, k_cls: int):
    """Batch order for the split schedule: [inst C, class C, inst C_p, class C_p]; returns (x, is_prior)."""
    if cls is None:
        return inst, torch.zeros(len(inst), dtype=torch.bool)
    x = torch.cat([inst[:k_inst], cls[:k_cls], inst[k_inst:], cls[k_cls:]])
    flags = [False] * k_inst + [True] * k_cls + [False] * (len(inst) - k_inst) + [True] * (len(cls) - k_cls)
    return x, torch.tensor(flags)


@dataclass
class TextEncoding:
    """``--train_text_encoder``: the prompts are encoded every step, with grad through the adapted text encoders."""

    pipe: object
    instance_prompt: str
    class_prompt: str | None
    resolution: int

    def encode(self, is_prior: torch.Tensor, device) -> Conditioning:
        """One prompt per sample in the batch's order (so ``split`` gives the encoder's first k samples C, as the
        UNet's); the passport mode set for the step covers the encoders' layers too."""
        prompts = [self.class_prompt if p else self.instance_prompt for p in is_prior.tolist()]
        return encode_text(self.pipe, prompts, device, size=self.resolution, grad=True)


@dataclass
class LossSetup:
    """What one training micro-batch needs: sets the passport for the step, returns the DreamBooth loss."""

    network: object
    vae: object
    noise_scheduler: object
    instance_emb: Conditioning
    class_emb: Conditioning | None
    prior_loss_weight: float
    schedule: str | None  # alternate | split; None for a plain LoRA
    cached_latents: bool
    device: torch.device
    weight_dtype: torch.dtype
    text: TextEncoding | None = None  # set with --train_text_encoder; else the fixed embeddings above are used
    class_labels: bool = False  # --class_labels_conditioning timesteps: the timesteps as the UNet's class_labels

    def loss(self, model, batch: dict, gen: torch.Generator, global_step: int) -> torch.Tensor:
        inst, cls = batch["instance"], batch.get("class")
        k_i = k_c = 0
        if self.schedule == "split":  # first k samples (instance and class alike) with C, the rest with C_p
            k_i = _split_count(len(inst), global_step)
            k_c = _split_count(len(cls), global_step) if cls is not None else 0
            self.network.set_passport("split", k_i + k_c)
        elif self.schedule == "alternate":  # C on even steps, C_p on odd steps: same on every process
            self.network.set_passport("C" if global_step % 2 == 0 else "C_p")
        x, is_prior = _arrange(inst, cls, k_i, k_c)
        if self.cached_latents:
            moments = x
        else:
            with torch.no_grad():
                moments = self.vae.encode(x.to(self.device, self.weight_dtype)).latent_dist.parameters
        latents = sample_latents(moments, gen, float(self.vae.config.scaling_factor)).to(self.device)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.text is not None:
            cond = self.text.encode(is_prior, self.device)
        else:
            cond = self.instance_emb.expand(len(latents))
        is_prior = is_prior.to(self.device)
        if self.text is None and self.class_emb is not None:  # prior samples take the class prompt's conditioning
            idx = torch.where(is_prior, 1, 0).to(cond.encoder_hidden_states.device)
            cond = Conditioning.cat([self.instance_emb, self.class_emb]).index(idx)
        extra = {"class_labels": timesteps} if self.class_labels else {}
        pred = model(noisy.to(self.weight_dtype), timesteps, **cond.to(dtype=self.weight_dtype).unet_kwargs(),
                     **extra, return_dict=False)[0]
        target = denoising_target(self.noise_scheduler, latents, noise, timesteps)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = per_sample[~is_prior].mean()
        if is_prior.any():
            loss = loss + self.prior_loss_weight * per_sample[is_prior].mean()
        return loss


def param_groups(network, args) -> list[dict]:
    """The optimizer's parameter groups: the UNet's A, B and (``--train_text_encoder``) the text encoders' A, B, the
    latter at ``--text_encoder_lr`` when given (as in diffusers' SDXL DreamBooth script)."""
    te_names = set(network.text_encoder_module_names)
    unet = [p for n, l in network.items() if n not in te_names for p in (l.lora_A, l.lora_B)]
    te = [p for n, l in network.items() if n in te_names for p in (l.lora_A, l.lora_B)]
    groups = [{"params": unet, "lr": args.learning_rate}]
    if te:
        groups.append({"params": te, "lr": getattr(args, "text_encoder_lr", None) or args.learning_rate})
    return groups
