"""The SEAL layer: wraps one ``nn.Linear`` of a diffusers ``Attention`` module.

    y = W x + (α/r) · B · C_t · A · dropout(x)

computed as ``B @ ((s·C_t·A) @ x)`` with s = α/r: the passport and the scale are folded into A on every call (an
r×r by r×in product, weight-sized, independent of the number of tokens), then x goes through two thin matmuls exactly
as in plain LoRA. ΔW (out × in) is never materialised and the per-token cost is that of LoRA; autograd carries the
gradient back through C_t to A. A is kaiming-uniform (from ``generator``: the trainer passes one drawn from the
secret, :func:`seal_diffusion.core.passport.init_generator`, so the public ``--seed`` says nothing about A), B zero; only A and B are parameters. C and C_p are
*non-persistent* buffers: they move with ``.to()`` but never enter a ``state_dict``.

The layer replaces the wrapped module's ``forward`` (an instance attribute, kohya style) instead of replacing the
module, so the UNet keeps its exact structure and ``state_dict``, and unpatching deletes the attribute to restore
exactly the original module. The active passport (``mode``) is set by :class:`~seal_diffusion.core.network.SealNetwork`:

* ``"C"`` / ``"C_p"`` — use that passport;
* ``"identity"`` — the passport replaced by I (the paper's N(B, A, ∅)); also the plain-LoRA mode;
* ``"off"`` — the adapter contributes nothing (the base model);
* ``"split"`` — the first ``split`` samples of the batch use C, the rest C_p;
* ``"interp"`` — the passport M + t·D with M = (C + C_p)/2, D = (C − C_p)/2 and ``t`` = :attr:`interp_t` (a scalar
  or one value per sample, may require grad): t = 1 is C, t = −1 is C_p, t = 0 the coin-free midpoint. Used by the
  function-level test (:mod:`seal_diffusion.detection.functional`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("C", "C_p", "identity", "off", "split", "interp")
_MISSING = object()


class SealLoRALayer(nn.Module):
    """LoRA factors A (r × in), B (out × r) and the passports of one wrapped ``nn.Linear``."""

    def __init__(
        self,
        name: str,
        base: nn.Linear,
        rank: int,
        alpha: float,
        passport: torch.Tensor | None = None,
        passport_p: torch.Tensor | None = None,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name}: SEAL adapts nn.Linear layers, got {type(base).__name__}")
        self.name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        device = base.weight.device
        a = torch.empty(rank, base.in_features)  # drawn on the CPU: a CPU generator works for every device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        for buf, value in (("passport", passport), ("passport_p", passport_p)):
            if value is not None and tuple(value.shape) != (rank, rank):
                raise ValueError(f"{name}: {buf} has shape {tuple(value.shape)}, expected ({rank}, {rank})")
            self.register_buffer(buf, None if value is None else value.detach().float().to(device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mode = "C" if passport is not None else "identity"
        self.split = 0
        self.interp_t: torch.Tensor | float = 0.0
        self._base = (base,)  # a tuple, so the frozen base is not registered as a child (no duplicate parameters)
        self._saved_forward = _MISSING

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    # -- patching -------------------------------------------------------------------------------------------------
    def patch(self) -> None:
        """Route the base module's calls through :meth:`forward`."""
        base = self.base
        if self._saved_forward is not _MISSING:
            return
        self._saved_forward = base.__dict__.get("forward", _MISSING)  # e.g. an accelerate offload hook
        self._base_forward = base.forward
        base.forward = self.forward

    def unpatch(self) -> None:
        """Restore the base module's own ``forward`` exactly as it was."""
        if self._saved_forward is _MISSING and "forward" not in self.base.__dict__:
            return
        base = self.base
        if base.__dict__.get("forward") is not None:
            del base.forward
        if self._saved_forward is not _MISSING:
            base.forward = self._saved_forward
        self._saved_forward = _MISSING
        self._base_forward = None

    # -- the computation ----------------------------------------------------------------------------------------
    def _passport_for(self, mode: str) -> torch.Tensor | None:
        if mode == "C":
            return self.passport
        if mode == "C_p":
            return self.passport_p
        return None

    def _down(self, c: torch.Tensor | None) -> torch.Tensor:
        """The effective down projection s·C·A (r × in); s·A without a passport. Weight-sized, computed per call."""
        a = self.lora_A if c is None else c @ self.lora_A
        return a if self.scale == 1.0 else a * self.scale

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r)·B·C_t·A·dropout(x) for the current mode (not including W x)."""
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            # under autocast F.linear casts x itself; a .to(float32) first would only add two full-size copies of x
            # (forward and backward) and round-trip back to the same low-precision values
            x = x.to(self.lora_A.dtype)
        if self.mode == "split":
            k = self.split
            if not 0 <= k <= x.shape[0]:
                raise ValueError(f"{self.name}: split {k} outside the batch of {x.shape[0]}")
            h = torch.cat([F.linear(x[:k], self._down(self.passport)), F.linear(x[k:], self._down(self.passport_p))])
        elif self.mode == "interp":
            t = self.interp_t
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                t = t.view(-1, *([1] * (x.dim() - 1)))
            mid = self._down((self.passport + self.passport_p) / 2)
            half = self._down((self.passport - self.passport_p) / 2)
            h = F.linear(x, mid) + t * F.linear(x, half)
        else:
            h = F.linear(x, self._down(self._passport_for(self.mode)))
        return F.linear(h, self.lora_B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self._base_forward(x, *args, **kwargs)
        if self.mode == "off":
            return y
        return y + self.lora_delta(x).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}, rank={self.rank}, alpha={self.alpha:g}, mode={self.mode}"
