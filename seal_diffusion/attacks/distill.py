"""The distillation attack: a fresh plain LoRA trained to reproduce a released LoRA's noise predictions.

No training images are needed: the inputs are random latents (``source="random"``) or noisy latents of images the
release itself generates (``source="samples"``), random timesteps and a pool of prompts (the LoRA's trigger prompt,
read from a model card beside it when there is one, plus generic ones). The student starts as a plain LoRA (kaiming A,
zero B) on the same layers and minimises ‖f_student − f_release‖² with Adam. Its per-layer ΔW ends up unrelated to
the release's (the weight test finds nothing); its function is the release's, which the function-level test
(:mod:`seal_diffusion.detection.functional`) still recognises.

Fidelity kept = 1 − ‖f_copy − f_release‖² / ‖f_base − f_release‖², measured on fresh inputs (other seed).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models.base_model import load_pipeline
from ..models.conditioning import Conditioning, encode_text
from ..errors import UserError
from ..evaluation.heldout import training_noise_scheduler
from ..formats.lora_file import write_lora
from ..core.network import SealNetwork
from ..detection.probes import GENERIC_PROMPTS, instance_prompt_near, merge_lora_into
from ..models.subject import INSTANCE_PROMPT

SOURCES = ("random", "samples")


@dataclass
class DistillResult:
    path: Path
    fidelity: float
    steps: int
    rank: int
    final_loss: float


def _prompt_pool(lora_path, prompts: list[str] | None) -> list[str]:
    if prompts:
        return list(prompts)
    p = Path(lora_path)
    card = instance_prompt_near(p / "README.md" if p.is_dir() else p)
    return [card or INSTANCE_PROMPT] + list(GENERIC_PROMPTS)


def _inputs(gen, n, shape, hidden_pool, sample_latents=None, scheduler=None):
    """A batch: latents, timesteps, text states (random latents, or noised samples of the release)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps if scheduler else 1000, (n,), generator=gen)
    idx = torch.randint(0, hidden_pool.batch, (n,), generator=gen)
    noise = torch.randn((n, *shape), generator=gen)
    if sample_latents is None:
        lat = noise
    else:
        pick = torch.randint(0, sample_latents.shape[0], (n,), generator=gen)
        lat = scheduler.add_noise(sample_latents[pick], noise, t)
    return lat, t, hidden_pool.index(idx)


def distill_lora(lora_path, out, *, base="tiny", rank: int = 4, steps: int = 400, lr: float = 3e-3,
                 batch: int = 4, seed: int = 0, source: str = "random", prompts: list[str] | None = None,
                 n_samples: int = 8, sample_steps: int = 10, config=None, overwrite: bool = False,
                 fidelity_inputs: int = 32, latent_size: int | None = None, progress=None,
                 show_progress: bool = False) -> DistillResult:
    """Distil the LoRA at ``lora_path`` into a fresh rank-``rank`` LoRA written to ``out`` (kohya layout).

    ``progress(step, steps)`` is called after every step; ``show_progress`` also draws a tqdm bar on stderr with the
    loss, like the trainer's (the CLI's ``attack distill``: 400 steps take minutes on a CPU).

    ``latent_size``: side of the random training latents (default the model's sample size; smaller is cheaper —
    the UNet is convolutional — and is what the tests use)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; refusing to overwrite it (pass --overwrite)")
    if source not in SOURCES:
        raise UserError(f"--source {source!r}: expected one of {', '.join(SOURCES)}")
    if rank < 1 or steps < 0 or batch < 1:
        raise UserError(f"--rank {rank} / --steps {steps}: rank ≥ 1 and steps ≥ 0 needed")
    pipe = load_pipeline(base, config=config)
    unet = pipe.unet.requires_grad_(False)
    teacher = copy.deepcopy(unet)
    merge_lora_into(teacher, lora_path)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the student's kaiming init
    pool = _prompt_pool(lora_path, prompts)
    hidden = Conditioning.cat([encode_text(pipe, p, "cpu") for p in pool]).to(dtype=torch.float32)
    cfg = unet.config
    native = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    size = latent_size or native
    shape = (cfg.in_channels, size, size)
    scheduler = training_noise_scheduler(pipe)
    sample_latents = None
    if source == "samples":
        student_free = pipe.unet
        pipe.unet = teacher
        try:
            g = torch.Generator().manual_seed(seed + 1)
            sample_latents = torch.cat([
                pipe(pool[i % len(pool)], num_inference_steps=sample_steps, generator=g,
                     output_type="latent").images.float() for i in range(n_samples)])
        finally:
            pipe.unet = student_free
        shape = tuple(sample_latents.shape[1:])
    net = SealNetwork(unet, rank, passports=None)
    opt = torch.optim.Adam(net.trainable_parameters(), lr=lr)
    loss_v = float("nan")
    bar = tqdm(total=steps, desc="distill", unit="step", disable=not show_progress, dynamic_ncols=True)
    for step in range(steps):
        lat, t, ehs = _inputs(gen, batch, shape, hidden, sample_latents, scheduler)
        with torch.no_grad():
            target = teacher(lat, t, **ehs.unet_kwargs()).sample
        loss = torch.nn.functional.mse_loss(unet(lat, t, **ehs.unet_kwargs()).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.3g}")
        if progress:
            progress(step + 1, steps)
    bar.close()
    fidelity = fidelity_kept(unet, teacher, net, hidden, (cfg.in_channels, native, native), fidelity_inputs, seed + 7,
                             scheduler, sample_latents)
    factors = {m: (a, b * net.alpha / net.rank) for m, (a, b) in net.factors().items()}
    net.remove()
    path = write_lora(factors, out, "kohya", name=out.stem, overwrite=overwrite)
    return DistillResult(path, fidelity, steps, rank, loss_v)


@torch.no_grad()
def fidelity_kept(unet, teacher, net, hidden, shape, n: int, seed: int, scheduler=None, sample_latents=None) -> float:
    """1 − ‖f_copy − f_release‖² / ‖f_base − f_release‖² on ``n`` fresh inputs (``net`` on ``unet`` is the copy)."""
    gen = torch.Generator().manual_seed(seed)
    num = den = 0.0
    mode = net.mode
    for s in range(0, n, 8):
        lat, t, ehs = _inputs(gen, min(8, n - s), shape, hidden, sample_latents, scheduler)
        f_rel = teacher(lat, t, **ehs.unet_kwargs()).sample
        net.set_passport(mode)
        f_copy = unet(lat, t, **ehs.unet_kwargs()).sample
        net.set_passport("off")
        f_base = unet(lat, t, **ehs.unet_kwargs()).sample
        num += float(((f_copy - f_rel) ** 2).sum())
        den += float(((f_base - f_rel) ** 2).sum())
    net.set_passport(mode)
    return 1.0 - num / den if den > 0 else float("nan")


def fidelity_of(lora_copy, lora_release, base="tiny", n: int = 32, seed: int = 7, pipe=None, config=None) -> float:
    """Fidelity kept of any LoRA file ``lora_copy`` w.r.t. ``lora_release`` (same formula, random inputs)."""
    pipe = pipe or load_pipeline(base, config=config)
    unet = pipe.unet
    rel, cp = copy.deepcopy(unet), copy.deepcopy(unet)
    merge_lora_into(rel, lora_release)
    merge_lora_into(cp, lora_copy)
    hidden = Conditioning.cat([encode_text(pipe, p, "cpu") for p in (INSTANCE_PROMPT, *GENERIC_PROMPTS)]).to(dtype=torch.float32)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    gen = torch.Generator().manual_seed(seed)
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, n, 8):
            lat, t, ehs = _inputs(gen, min(8, n - s), (cfg.in_channels, size, size), hidden)
            f_rel = rel(lat, t, **ehs.unet_kwargs()).sample
            num += float(((cp(lat, t, **ehs.unet_kwargs()).sample - f_rel) ** 2).sum())
            den += float(((unet(lat, t, **ehs.unet_kwargs()).sample - f_rel) ** 2).sum())
    return 1.0 - num / den if den > 0 else float("nan")
