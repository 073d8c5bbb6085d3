"""Installing SEAL layers on a diffusers UNet (and, optionally, its CLIP text encoders), and switching the active
passport for all of them at once.

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
    ``unet.save_pretrained`` are untouched; the private key is written only by :mod:`seal_diffusion.core.keyfile`;
(d) :meth:`SealNetwork.remove` deletes the patched ``forward`` attributes: the UNet is exactly the original again;
(e) each layer computes B·(C·(A·x)); ΔW is never formed.

Text encoders (``--train_text_encoder``): ``text_encoders={"text_encoder": te, "text_encoder_2": te2}`` also wraps
``q_proj``/``k_proj``/``v_proj``/``out_proj`` of every CLIP attention, named ``text_encoder.<path>`` (the key's and the
diffusers layout's names). The same switch covers them (``split`` works when the encoder gets the same batch order as
the UNet), and :meth:`SealNetwork.remove` unpatches them too. Their layers come after the UNet's, so adding them
changes neither the UNet layers' order nor their A initialisation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from ..errors import UserError
from .layer import MODES, SealLoRALayer
from ..formats.lora_file import read_lora
from ..formats.lora_names import TEXT_ENCODER_TARGETS, TEXT_ENCODERS
from .passport import release_swap

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADDED_KV_TARGETS = ("add_k_proj", "add_v_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + ADDED_KV_TARGETS


def find_target_modules(unet: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """``{module path: nn.Linear}`` for the targets of every diffusers ``Attention`` in ``unet``, in model order.

    Targets an Attention does not have (``add_k_proj`` is None outside SimpleCrossAttn blocks) are skipped quietly.
    """
    from diffusers.models.attention_processor import Attention  # lazy: diffusers is heavy; the CLI starts without it

    unknown = set(targets) - set(DEFAULT_TARGETS) - set(TEXT_ENCODER_TARGETS)
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


def find_text_encoder_modules(text_encoder: nn.Module, prefix: str = "text_encoder",
                              targets: tuple[str, ...] = TEXT_ENCODER_TARGETS) -> dict[str, nn.Linear]:
    """``{prefix.text_model.path: nn.Linear}`` for q/k/v/out projections of every CLIP attention (``…self_attn``), in
    model order.

    Names always read ``text_model.encoder.layers.N.self_attn.q_proj`` below the prefix, the path of the CLIP
    checkpoints and of every LoRA file in the wild; transformers 5 dropped the ``text_model`` level from
    ``CLIPTextModel`` (its modules are ``encoder.layers.…``), so it is put back in the name.
    """
    found: dict[str, nn.Linear] = {}
    wanted = [t for t in TEXT_ENCODER_TARGETS if t in targets]
    for attn_name, attn in text_encoder.named_modules():
        if attn_name and all(isinstance(getattr(attn, t, None), nn.Linear) for t in TEXT_ENCODER_TARGETS):
            path = attn_name if attn_name.startswith("text_model.") else f"text_model.{attn_name}"
            for target in wanted:
                found[f"{prefix}.{path}.{target}"] = getattr(attn, target)
    return found


def text_encoders_of(pipe) -> dict[str, nn.Module]:
    """``{"text_encoder": …, "text_encoder_2": …}``: the pipeline's CLIP text encoders that exist."""
    return {name: te for name in TEXT_ENCODERS if (te := getattr(pipe, name, None)) is not None}


def target_modules(unet: nn.Module, text_encoders: Mapping[str, nn.Module] | None = None,
                   targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """Every module a :class:`SealNetwork` adapts, in its order: the UNet's, then each text encoder's."""
    found = find_target_modules(unet, tuple(t for t in targets if t in DEFAULT_TARGETS))
    te_targets = tuple(t for t in targets if t in TEXT_ENCODER_TARGETS) or TEXT_ENCODER_TARGETS
    for prefix, te in (text_encoders or {}).items():
        if prefix not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder {prefix!r}; expected one of {list(TEXT_ENCODERS)}")
        found.update(find_text_encoder_modules(te, prefix, te_targets))
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
    :func:`~seal_diffusion.core.passport.init_generator` of the secret so that A, like the passports, follows from it.
    ``secret_kdf`` (set by the trainer) is the passphrase's salt record, written only into the private key.
    ``text_encoders`` (``{"text_encoder": te, "text_encoder_2": te2}``) adds the encoders' attention projections.
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
        text_encoders: Mapping[str, nn.Module] | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.targets = tuple(t for t in targets if t in DEFAULT_TARGETS)  # the UNet's (what checkpoints record)
        self.is_seal = passports is not None
        modules = target_modules(unet, text_encoders, tuple(targets))
        if not any(n.partition(".")[0] not in TEXT_ENCODERS for n in modules):
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
        self._text_encoders = dict(text_encoders or {})  # a plain dict: the encoders are not children either
        self.mode = "C" if self.is_seal else "identity"
        for layer in self._layers.values():
            layer.patch()

    # -- access ---------------------------------------------------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return dict(self._text_encoders)

    @property
    def module_names(self) -> list[str]:
        return list(self._layers)

    @property
    def text_encoder_module_names(self) -> list[str]:
        return [n for n in self._layers if n.partition(".")[0] in TEXT_ENCODERS]

    @property
    def all_targets(self) -> list[str]:
        """The target kinds adapted: the UNet's projections, then the text encoders' (when any): key metadata."""
        return list(self.targets) + (list(TEXT_ENCODER_TARGETS) if self.text_encoder_module_names else [])

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
        :func:`seal_diffusion.core.passport.release_swap`); returns how many were swapped. Random passports only: an image
        passport stays C (the picture is the point), at the price of an indicative rather than exact p-value."""
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
        """Unpatch every layer: the UNet's (and text encoders') modules behave exactly as before."""
        for layer in self._layers.values():
            layer.unpatch()

    def forward(self, *args, **kwargs):
        """Runs the UNet (so accelerate/DDP can wrap the network, whose parameters are the trainable ones)."""
        return self._unet[0](*args, **kwargs)


def network_from_key(key, pipe, *, text_encoders: bool = True) -> SealNetwork:
    """A :class:`SealNetwork` holding ``key``'s raw factors and both passports (mode C) on ``pipe.unet`` and — when the
    key has text-encoder modules and ``text_encoders`` is true — on the pipeline's text encoder(s) too.

    ``pipe`` may also be a bare UNet (then only UNet modules are built). ``text_encoders=False`` builds the UNet
    modules only (the function-level and image tests, which probe the UNet). A key that does not fit the model is a
    :class:`~seal_diffusion.errors.UserError`. Remove the network with ``.remove()``.
    """
    unet = getattr(pipe, "unet", pipe)
    wanted = {n.partition(".")[0] for n in key.modules if n.partition(".")[0] in TEXT_ENCODERS}
    encoders = {}
    if text_encoders and wanted:
        have = text_encoders_of(pipe) if unet is not pipe else {}
        lacking = sorted(wanted - set(have))
        if lacking:
            raise UserError(f"key has {', '.join(lacking)} layers but the base model has no such text encoder; was it "
                            f"trained on {key.base_model!r}?")
        encoders = {p: have[p] for p in TEXT_ENCODERS if p in wanted}
    targets = tuple(key.target_modules) if key.target_modules else DEFAULT_TARGETS
    passports = {m: (mk.passport, mk.passport_p) for m, mk in key.modules.items()}
    try:
        net = SealNetwork(unet, key.rank, key.alpha, passports=passports, targets=targets, text_encoders=encoders)
    except ValueError as exc:
        raise UserError(f"key does not fit this base model ({exc}); was it trained on {key.base_model!r}?") from exc
    try:
        net.load_factors({m: (mk.lora_A, mk.lora_B) for m, mk in key.modules.items()})
    except ValueError as exc:
        net.remove()
        raise UserError(f"key does not fit this base model ({exc}); was it trained on {key.base_model!r}?") from exc
    return net


def init_from_lora(network, path) -> None:
    """Load a public LoRA's factors (scale folded into up) into a network: A = down, B = up / (α/r); in a SEAL
    network B = up·C⁻¹ / (α/r), so that ΔW with passport C starts as the file's (C_p's adapter starts elsewhere and
    training makes it work too). Layers the file lacks keep the network's own start.

    The trainer calls it for ``--init_lora``: with a plain network, the fine-tuning attack's start (entry point
    :func:`seal_diffusion.attacks.finetune.finetune_lora`); with a SEAL network, a thief's SEAL run on top of a stolen file
    (``tests/test_dispute.py``)."""
    lora = read_lora(path)
    found = lora.by_module(network.module_names)
    if not found:
        raise UserError(f"{path}: none of its layers match this base model's attention layers")
    scale = network.alpha / network.rank
    factors = {}
    for m in network.module_names:
        if m not in found:
            factors[m] = (network[m].lora_A.detach().cpu(), network[m].lora_B.detach().cpu())
            continue
        d, u = found[m]
        b = u.double() / scale
        if network.is_seal:
            b = b @ torch.linalg.inv(network[m].passport.detach().cpu().double())
        factors[m] = (d, b.float())
    network.load_factors(factors)
