"""Installing SEAL layers on a diffusers UNet, and switching the active passport for all of them at once.

Why a module-level patch and not an attention processor: diffusers ≥ 0.3x moved LoRA out of attention processors
(the old ``LoRAAttnProcessor*`` classes are empty stubs in 0.42) because a processor-level LoRA has to be rewritten for
every processor (SDPA, xformers, sliced, IP-Adapter, added-KV…). Wrapping the projection layers themselves
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``, and ``add_k_proj``/``add_v_proj`` where an ``Attention`` has them) works
under *any* processor, because every processor calls ``attn.to_q(...)`` etc. We do not use PEFT's layers either: a
persistent buffer on a PEFT tuner layer is exported by ``get_peft_model_state_dict`` (the secret would leak), and
``fuse_lora`` silently drops anything that is not lora_A/lora_B. So:

(a) works with any attention processor — the patch sits below the processor;
(b) one setter / context manager switches C, C_p, identity (∅), off for every layer, and ``split`` runs the first k
    samples of a batch with C and the rest with C_p;
(c) the passports are non-persistent buffers and A, B live in this network, not in the UNet: ``unet.state_dict()`` and
    ``unet.save_pretrained`` are untouched; the private key is written only by :mod:`seal_diffusion.keyfile`;
(d) :meth:`SealNetwork.remove` deletes the patched ``forward`` attributes: the UNet is exactly the original again;
(e) each layer computes B·(C·(A·x)); ΔW is never formed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from .layer import MODES, SealLoRALayer

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADDED_KV_TARGETS = ("add_k_proj", "add_v_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + ADDED_KV_TARGETS


def find_target_modules(unet: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """``{module path: nn.Linear}`` for the targets of every diffusers ``Attention`` in ``unet``, in model order.

    Targets an Attention does not have (``add_k_proj`` is None outside SimpleCrossAttn blocks) are skipped quietly.
    """
    from diffusers.models.attention_processor import Attention

    unknown = set(targets) - set(DEFAULT_TARGETS)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}; choose from {list(DEFAULT_TARGETS)}")
    found: dict[str, nn.Linear] = {}
    for attn_name, attn in unet.named_modules():
        if not isinstance(attn, Attention):
            continue
        for target in targets:
            module = attn.get_submodule(target) if _has_submodule(attn, target) else None
            if isinstance(module, nn.Linear):
                found[f"{attn_name}.{target}" if attn_name else target] = module
    return found


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


class SealNetwork(nn.Module):
    """All SEAL layers of one UNet. Holds the trainable A, B; the UNet itself stays frozen and unchanged.

    ``passports`` maps module path → (C, C_p); ``None`` makes a plain LoRA through the same code (mode ``identity``).
    ``generator`` draws every A's initialisation (default: the global RNG); pass
    :func:`~seal_diffusion.passport.init_generator` of the secret so that A, like the passports, follows from it.
    ``secret_kdf`` (set by the trainer) is the passphrase's salt record, written only into the private key.
    """

    secret_kdf: str = ""

    def __init__(
        self,
        unet: nn.Module,
        rank: int,
        alpha: float | None = None,
        passports: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        targets: tuple[str, ...] = DEFAULT_TARGETS,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.targets = tuple(targets)
        self.is_seal = passports is not None
        modules = find_target_modules(unet, self.targets)
        if not modules:
            raise ValueError("no Attention projection layers found in the UNet")
        if passports is not None:
            missing = [m for m in modules if m not in passports]
            if missing:
                raise ValueError(f"no passport for {len(missing)} module(s), e.g. {missing[0]}")
        self._layers: dict[str, SealLoRALayer] = {}
        # nn.ModuleDict keys may not contain '.', so children are registered under an index; names live in _layers
        self.layers = nn.ModuleList()
        for name, base in modules.items():
            c, c_p = passports[name] if passports is not None else (None, None)
            layer = SealLoRALayer(name, base, rank, self.alpha, c, c_p, dropout, generator)
            self.layers.append(layer)
            self._layers[name] = layer
        self._unet = (unet,)
        self.mode = "C" if self.is_seal else "identity"
        for layer in self._layers.values():
            layer.patch()

    # -- access ---------------------------------------------------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    @property
    def module_names(self) -> list[str]:
        return list(self._layers)

    def __getitem__(self, name: str) -> SealLoRALayer:
        return self._layers[name]

    def items(self):
        return self._layers.items()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self._layers.values() for p in (layer.lora_A, layer.lora_B)]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A, B)}`` as detached fp32 CPU copies."""
        return {n: (l.lora_A.detach().float().cpu(), l.lora_B.detach().float().cpu()) for n, l in self._layers.items()}

    def passports(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not self.is_seal:
            raise ValueError("a plain LoRA network has no passports")
        return {n: (l.passport.cpu(), l.passport_p.cpu()) for n, l in self._layers.items()}

    @torch.no_grad()
    def assign_release_passports(self) -> int:
        """After training: swap C and C_p in the modules whose secret coin says so (see
        :func:`seal_diffusion.passport.release_swap`); returns how many were swapped. Random passports only: an image
        passport stays C (the picture is the point), at the price of an indicative rather than exact p-value."""
        from .passport import release_swap

        swapped = 0
        for layer in self._layers.values():
            if release_swap(layer.passport.cpu(), layer.passport_p.cpu()):
                layer.passport, layer.passport_p = layer.passport_p.clone(), layer.passport.clone()
                swapped += 1
        return swapped

    @torch.no_grad()
    def load_factors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set A and B of every layer from ``{module: (A, B)}`` (all modules must be present, shapes must match)."""
        missing = [n for n in self._layers if n not in factors]
        if missing:
            raise ValueError(f"factors missing for {len(missing)} module(s), e.g. {missing[0]}")
        for name, layer in self._layers.items():
            a, b = factors[name]
            if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
                raise ValueError(
                    f"{name}: factor shapes {tuple(a.shape)}/{tuple(b.shape)} do not match "
                    f"{tuple(layer.lora_A.shape)}/{tuple(layer.lora_B.shape)}"
                )
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)

    # -- passport switching -----------------------------------------------------------------------------------------
    def set_passport(self, mode: str, split: int = 0) -> None:
        """Make every layer use ``mode`` (C, C_p, identity, off, split); ``split`` = samples run with C."""
        if mode not in MODES:
            raise ValueError(f"unknown passport mode {mode!r}; choose from {MODES}")
        if mode in ("C", "C_p", "split", "interp") and not self.is_seal:
            raise ValueError(f"mode {mode!r} needs passports; this is a plain LoRA network")
        self.mode = mode
        for layer in self._layers.values():
            layer.mode = mode
            layer.split = split

    def set_interp(self, t: torch.Tensor) -> None:
        """Mode ``interp`` with per-layer coefficients: layer i uses M_i + t[i]·D_i (``t``: L, or L × batch for one
        value per sample; may require grad, then ∂output/∂t[i] is the direction of layer i's release coin)."""
        if t.shape[0] != len(self._layers):
            raise ValueError(f"interp: {t.shape[0]} coefficients for {len(self._layers)} layers")
        self.set_passport("interp")
        for layer, ti in zip(self._layers.values(), t):
            layer.interp_t = ti

    @contextlib.contextmanager
    def passport(self, mode: str, split: int = 0) -> Iterator["SealNetwork"]:
        """``with net.passport("C_p"): ...`` — switch all layers, restore the previous mode afterwards."""
        previous = self.mode, next(iter(self._layers.values())).split
        self.set_passport(mode, split)
        try:
            yield self
        finally:
            self.set_passport(*previous)

    # -- removal ----------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Unpatch every layer: the UNet's modules behave exactly as before :class:`SealNetwork` was created."""
        for layer in self._layers.values():
            layer.unpatch()

    def forward(self, *args, **kwargs):
        """Runs the UNet (so accelerate/DDP can wrap the network, whose parameters are the trainable ones)."""
        return self._unet[0](*args, **kwargs)
