"""Images from one base pipeline with a SEAL key's network on it: the rendering that compare, the claim check, the
image check and the robustness matrix share.

* :func:`generate` — images for ``[(prompt, seed), …]``; image i always starts from ``Generator(seed)``'s noise, so
  the same jobs give the same initial noise for every variant;
* :func:`render_variants` — the five variants of :data:`VARIANTS` with one pipeline, which is left as it was:

  * ``base``      — the base model alone;
  * ``C``         — the SEAL network with the secret passport C (what the owner trained and released);
  * ``C_p``       — the same factors with the second passport C_p (the claim check: close to C);
  * ``identity``  — the passport replaced by I, the paper's N(B, A, ∅) (close to the base when σ is large);
  * ``exported``  — the public LoRA rebuilt from the key (:func:`~seal_diffusion.core.export.export_lora`, diffusers
    layout) and loaded with ``pipe.load_lora_weights``, as any user would — must be the same images as ``C``.
"""

from __future__ import annotations

import tempfile
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.export import export_lora
from ..core.network import network_from_key

VARIANTS = ("base", "C", "C_p", "identity", "exported")
VARIANT_LABELS = {
    "base": "base model",
    "C": "SEAL, passport C",
    "C_p": "SEAL, passport C_p",
    "identity": "no passport (C = I)",  # the paper's N(B,A,∅); the default font has no ∅ glyph
    "exported": "exported LoRA (diffusers)",
}


def default_size(pipe) -> int:
    """The model's native image size: UNet sample size × VAE scale factor (512 for SD 1.5, 64 for tiny)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def generate(pipe, jobs: Sequence[tuple[str, int]], *, steps: int, guidance_scale: float, height: int, width: int,
             batch_size: int = 4, on_batch: Callable[[int], object] | None = None) -> np.ndarray:
    """Images (N, H, W, 3) float in [0, 1] for ``jobs`` = [(prompt, seed), …]; image i uses ``Generator(seed)``.

    The same jobs give the same initial noise for every variant, so differences come from the weights only.
    """
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for _, s in chunk]
        res = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                   width=width, generator=gens, output_type="np")
        out.append(np.asarray(res.images, dtype=np.float32))
        if on_batch:
            on_batch(len(chunk))
    return np.concatenate(out)


def render_variants(pipe, key, jobs, variants=VARIANTS, *, steps: int, guidance_scale: float, height: int,
                    width: int, batch_size: int = 4, tick: Callable[[int, str], object] | None = None) -> dict:
    """``{variant: images}`` for the requested variants with one pipeline; the pipeline is left as it was."""
    tick = tick or (lambda n, what: None)
    gen = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width, batch_size=batch_size)
    images: dict[str, np.ndarray] = {}
    if "base" in variants:
        images["base"] = generate(pipe, jobs, on_batch=lambda n: tick(n, "base"), **gen)
    seal_modes = [v for v in ("C", "C_p", "identity") if v in variants]
    if seal_modes:
        net = network_from_key(key, pipe)
        try:
            for mode in seal_modes:
                with net.passport(mode):
                    images[mode] = generate(pipe, jobs, on_batch=lambda n, m=mode: tick(n, m), **gen)
        finally:
            net.remove()  # the UNet is exactly the base again
    if "exported" in variants:
        with tempfile.TemporaryDirectory(prefix="seal-compare-") as tmp:
            export_lora(key, tmp, "diffusers")
            pipe.load_lora_weights(tmp, adapter_name="seal_export")
            try:
                images["exported"] = generate(pipe, jobs, on_batch=lambda n: tick(n, "exported"), **gen)
            finally:
                pipe.unload_lora_weights()
    return images
