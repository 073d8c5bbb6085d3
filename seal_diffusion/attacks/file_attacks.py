"""Attacks that try to remove or blur the watermark of a released LoRA.

Each file attack takes a :class:`~seal_diffusion.formats.lora_file.LoraFile` and returns a new one in the same layout, i.e.
an ordinary LoRA a thief could publish. Product-preserving obfuscations (rescale, permute, mix, pad-rank, refactor-svd)
leave ΔW = up·down unchanged and therefore the recovered passport too; the others change ΔW (prune, quantize, noise,
merge-lora, truncated refactor-svd). ``finetune`` (continued plain-LoRA training) lives in
:mod:`seal_diffusion.attacks.finetune` and starts from :func:`seal_diffusion.core.network.init_from_lora`; ``merge-checkpoint``
and ``ambiguity`` (forged second passports, checked by the claim check) are at the end of this module. All
randomness comes from ``seed``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..models.base_model import load_pipeline
from ..formats.checkpoint import save_single_file
from ..errors import UserError
from ..formats.lora_file import LoraFile, kohya_stem, read_lora

Entries = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _map(lora: LoraFile, fn) -> LoraFile:
    return LoraFile(lora.layout, {stem: fn(stem, d, u) for stem, (d, u) in lora.entries.items()}, dict(lora.metadata))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prune_tensor(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` fraction of entries with the smallest magnitude."""
    k = int(round(ratio * t.numel()))
    if k <= 0:
        return t.clone()
    out = t.clone().flatten()
    out[torch.argsort(out.abs())[:k]] = 0
    return out.view_as(t)


def _low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float()


def prune(lora: LoraFile, ratio: float, on: str = "factors") -> LoraFile:
    """Magnitude pruning per tensor: of the factors (``on="factors"``), or of ΔW, re-factored at the same rank."""
    if not 0 <= ratio < 1:
        raise UserError(f"--ratio {ratio}: must be in [0, 1)")
    if on == "factors":
        return _map(lora, lambda s, d, u: (_prune_tensor(d, ratio), _prune_tensor(u, ratio)))
    if on == "delta":
        return _map(lora, lambda s, d, u: _low_rank(_prune_tensor(u.double() @ d.double(), ratio), d.shape[0]))
    raise UserError(f"--on {on!r}: expected 'factors' or 'delta'")


def rescale(lora: LoraFile, factor: float = 4.0) -> LoraFile:
    """up·k, down/k: the product is unchanged."""
    if factor == 0:
        raise UserError("--factor must be non-zero")
    return _map(lora, lambda s, d, u: (d / factor, u * factor))


def permute(lora: LoraFile, seed: int = 0) -> LoraFile:
    """Shuffle the rank dimension: up·Pᵀ, P·down."""
    g = _gen(seed)

    def one(stem, d, u):
        perm = torch.randperm(d.shape[0], generator=g)
        return d[perm].clone(), u[:, perm].clone()

    return _map(lora, one)


def mix(lora: LoraFile, seed: int = 0, condition: float = 10.0) -> LoraFile:
    """up·M, M⁻¹·down with a random invertible M (orthogonal × log-uniform scales, condition number ≤ ``condition``)."""
    g = _gen(seed)

    def one(stem, d, u):
        r = d.shape[0]
        q, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        scales = torch.exp(torch.rand(r, generator=g, dtype=torch.float64) * torch.log(torch.tensor(condition)))
        m = q * scales
        return (torch.linalg.solve(m, d.double())).float(), (u.double() @ m).float()

    return _map(lora, one)


def pad_rank(lora: LoraFile, extra: int = 4, seed: int = 0) -> LoraFile:
    """Add ``extra`` rank: random down rows with zero up columns (the product is unchanged, the file looks bigger)."""
    if extra < 1:
        raise UserError(f"--extra {extra}: must be ≥ 1")
    g = _gen(seed)

    def one(stem, d, u):
        scale = float(d.std()) if d.numel() > 1 else 1.0
        new_d = torch.cat([d, torch.randn(extra, d.shape[1], generator=g) * scale])
        return new_d, torch.cat([u, torch.zeros(u.shape[0], extra)], dim=1)

    return _map(lora, one)


def refactor_svd(lora: LoraFile, rank: int | None = None) -> LoraFile:
    """Re-factor ΔW = up·down by its SVD (balanced √S on both sides), optionally truncated to ``rank``."""

    def one(stem, d, u):
        qu, ru = torch.linalg.qr(u.double())
        qd, rd = torch.linalg.qr(d.double().T)
        us, s, vh = torch.linalg.svd(ru @ rd.T)
        k = min(rank or d.shape[0], s.numel())
        root = s[:k].sqrt()
        return (root[:, None] * (vh[:k] @ qd.T)).float(), ((qu @ us[:, :k]) * root).float()

    return _map(lora, one)


def quantize(lora: LoraFile, dtype: str = "fp16") -> LoraFile:
    """Round the factors: fp16 / bf16 (stored so), or int8 symmetric per-tensor (dequantised to fp32)."""
    if dtype in ("fp16", "bf16"):
        torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
        return _map(lora, lambda s, d, u: (d.to(torch_dtype), u.to(torch_dtype)))
    if dtype == "int8":
        def q8(t):
            step = float(t.abs().max()) / 127 or 1.0
            return (torch.round(t / step).clamp(-127, 127) * step).float()

        return _map(lora, lambda s, d, u: (q8(d), q8(u)))
    raise UserError(f"--dtype {dtype!r}: expected fp16, bf16 or int8")


def noise(lora: LoraFile, std: float = 0.1, seed: int = 0) -> LoraFile:
    """Add Gaussian noise with standard deviation ``std`` × RMS of each factor."""
    g = _gen(seed)

    def noisy(t):
        rms = float(t.double().pow(2).mean().sqrt())
        return t + torch.randn(t.shape, generator=g) * std * rms

    return _map(lora, lambda s, d, u: (noisy(d), noisy(u)))


def merge_lora(lora: LoraFile, other: LoraFile, weight: float = 1.0, self_weight: float = 1.0,
               rank: int | None = None) -> LoraFile:
    """self_weight·ΔW + weight·ΔW_other as one LoRA (ranks concatenated; ``rank`` re-factors by SVD to that rank)."""
    if other.layout != lora.layout:
        # align the other file's key names with ours through module paths
        if lora.layout == "kohya":
            other_entries = {kohya_stem(m): f for m, f in other.entries.items()}
        else:
            lookup = {kohya_stem(m): m for m in lora.entries}
            other_entries = {lookup[s]: f for s, f in other.entries.items() if s in lookup}
    else:
        other_entries = other.entries
    out = {}
    for stem, (d, u) in lora.entries.items():
        if stem in other_entries:
            d2, u2 = other_entries[stem]
            if u2.shape[0] != u.shape[0] or d2.shape[1] != d.shape[1]:
                raise UserError(f"{other.path}: {stem} has a different layer shape; not the same base model")
            out[stem] = (torch.cat([d, d2]), torch.cat([u * self_weight, u2 * weight], dim=1))
        else:
            out[stem] = (d, u * self_weight)
    merged = LoraFile(lora.layout, out, dict(lora.metadata))
    return refactor_svd(merged, rank) if rank else merged


FILE_ATTACKS = {
    "prune": prune,
    "rescale": rescale,
    "permute": permute,
    "mix": mix,
    "pad-rank": pad_rank,
    "refactor-svd": refactor_svd,
    "quantize": quantize,
    "noise": noise,
    "merge-lora": merge_lora,
}


# -- merge into a checkpoint ------------------------------------------------------------------------------------------
def merge_into_checkpoint(lora_path: str | os.PathLike, base: str, out: str | os.PathLike, *, weight: float = 1.0,
                          config=None, overwrite: bool = False) -> Path:
    """Bake the LoRA into the base model's UNet (W + w·ΔW) and save the model: ``*.safetensors`` → one LDM
    single-file checkpoint (A1111/ComfyUI style), anything else → a diffusers folder."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; refusing to overwrite it (pass --force)")
    pipe = load_pipeline(base, config=config)
    modules = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    factors = read_lora(lora_path).by_module(modules)
    if not factors:
        raise UserError(f"{lora_path}: none of its modules exist in {base}")
    with torch.no_grad():
        for name, (d, u) in factors.items():
            layer = pipe.unet.get_submodule(name)
            layer.weight += (weight * (u.double() @ d.double())).to(layer.weight.dtype)
    if out.suffix.lower() == ".safetensors":
        return save_single_file(pipe, out, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(tmp), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- the fine-tuning attack's start ---------------------------------------------------------------------------------
