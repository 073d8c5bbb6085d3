"""Export: rebuild the public LoRA from the private key alone (fold C into the factors, write a layout)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from .fold import fold
from .keyfile import SealKey
from ..formats.lora_file import write_lora


def public_factors(key: SealKey) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A′, B′)}`` with B′A′ = (α/r)·B·C·A for every module of the key."""
    return {
        name: fold(mk.lora_A, mk.lora_B, mk.passport, key.scale) for name, mk in key.modules.items()
    }


def export_lora(key: SealKey, path: str | os.PathLike, layout: str, name: str = "lora", *, overwrite: bool = True,
                metadata: dict[str, str] | None = None) -> Path:
    """Write the public LoRA of ``key`` in ``layout`` (diffusers | kohya) to ``path`` (``metadata``: training facts
    for the kohya layout, see :func:`seal_diffusion.formats.kohya_meta.training_metadata`)."""
    path = Path(path)
    if layout == "kohya" and path.is_dir():
        raise UserError(f"--out {path}: is a folder; the kohya layout is one file (give a NAME.safetensors path)")
    return write_lora(public_factors(key), path, layout, name, overwrite=overwrite, metadata=metadata,
                      architecture=key.architecture)
