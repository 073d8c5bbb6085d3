"""Folding the passport into the factors, so the release is an ordinary LoRA.

    C = U S Vᵀ,  C1 = U S^½,  C2 = S^½ Vᵀ,  B′ = (α/r) · B · C1,  A′ = C2 · A

so that B′A′ = (α/r)·B·C·A exactly (float64 arithmetic, cast back). The α/r scale goes into B′: the files then declare
alpha = rank, which every frontend (diffusers, kohya, A1111, ComfyUI) reads as scale 1.
"""

from __future__ import annotations

import torch


def split_passport(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C1, C2) in float64 with C1 @ C2 = C: C1 = U S^½, C2 = S^½ Vᵀ."""
    u, s, vh = torch.linalg.svd(c.double())
    root = s.sqrt()
    return u * root, root[:, None] * vh


def fold(
    lora_A: torch.Tensor, lora_B: torch.Tensor, passport: torch.Tensor | None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public factors (A′, B′) with B′A′ = scale · B · C · A; ``passport=None`` folds only the scale (plain LoRA)."""
    a, b = lora_A.double(), lora_B.double()
    if passport is not None:
        c1, c2 = split_passport(passport)
        b, a = b @ c1, c2 @ a
    return a.to(lora_A.dtype).contiguous(), (b * scale).to(lora_B.dtype).contiguous()
