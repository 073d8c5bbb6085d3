"""Export: rebuild the public LoRA from the private key alone (fold C into the factors, write a layout)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .fold import fold
from .keyfile import SealKey
from .lora_file import write_lora


def public_factors(key: SealKey) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A′, B′)}`` with B′A′ = (α/r)·B·C·A for every module of the key."""
    return {
        name: fold(mk.lora_A, mk.lora_B, mk.passport, key.scale) for name, mk in key.modules.items()
    }


def export_lora(key: SealKey, path: str | os.PathLike, layout: str, name: str = "lora", *, overwrite: bool = True) -> Path:
    """Write the public LoRA of ``key`` in ``layout`` (diffusers | kohya) to ``path``."""
    return write_lora(public_factors(key), path, layout, name, overwrite=overwrite, architecture=key.architecture)
