"""One reader of suspects for every test: the per-layer weight update ΔW of a LoRA file (or of several files loaded
together, each at its strength) exactly as a frontend applies it to the base model.

The weight test (:mod:`seal_diffusion.detection.verify`) reads a suspect through :func:`seal_diffusion.formats.lora_file.read_lora`; the
function-level test, ``attack distill`` and the robustness matrix merge it into a UNet. Both go through the same
reader, so every layout ``verify`` reads is also applied: kohya/PEFT/diffusers/attention-processor keys, diffusers or
LDM names, LyCORIS LoCon, LoHa, LoKr and full (``.diff``, with its bias ``.diff_b``) — on Linear and on conv layers.

What a frontend does (ComfyUI ``weight_adapter``, A1111 ``networks``, LyCORIS), reproduced here per layer:

* low-rank (``lora_down``/``lora_up``, ``lora_A``/``lora_B``, …): ΔW = up·down·α/r, r = down's rank, α = 1·r when the
  file has no alpha; a conv pair is multiplied over its flattened kernels, a Tucker core (``lora_mid``) between them;
* LoHa: (w1a·w1b) ⊙ (w2a·w2b)·α/r (CP cores ``hada_t1``/``hada_t2`` for conv); LoKr: kron(w1, w2)·α/r with r the rank
  of the factored part (1 when both are full); full: ``diff`` as is;
* several files, or one file at a strength: ΔW = Σ_i strength_i·ΔW_i (a layer named twice, diffusers and LDM names,
  gets both updates, as ComfyUI applies both);
* every product in float64 from the tensors as stored (an fp16/bf16 file's values), added to the layer in its dtype.

Not applied (and reported in ``not_applied``): text-encoder layers (the function-level probes are UNet forwards on
fixed text conditioning; the weight test covers those layers), UNet layers under names no frontend maps to this
model, DoRA magnitudes, LyCORIS kinds that are neither LoCon, LoHa, LoKr nor full (OFT, BOFT, …).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence

import torch

from ..errors import UserError
from .lora_file import LoraFile, _is_te_stem, read_lora
from .lora_names import candidate_names


@dataclass
class SuspectWeights:
    """``deltas[module] = ΔW`` (the layer's weight shape, float64, strengths applied), bias updates, what was left."""

    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    not_applied: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _scale(parts: Mapping[str, torch.Tensor], rank: int | None) -> float:
    alpha = parts.get("alpha")
    return float(alpha) / rank if alpha is not None and rank else 1.0


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP/Tucker rebuild (out × in × kh × kw) from a core t and the two factor matrices."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def conv_delta(parts: Mapping[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """ΔW of a conv layer from its raw LoCon/LyCORIS parts (float64, ``shape`` = the layer's weight shape)."""
    p = {k: v.double() for k, v in parts.items()}
    if "down" in p:  # LoCon: down (r, in, kh, kw) or (r, in, 1, 1) with a Tucker core, up (out, r, 1, 1)
        down, up = p["down"], p["up"]
        r = down.shape[0]
        if "lora_mid.weight" in p:
            w = torch.einsum("o a, a b k l, b i -> o i k l", up.flatten(1), p["lora_mid.weight"], down.flatten(1))
        else:
            w = up.flatten(1) @ down.flatten(1)
        return w.reshape(shape) * _scale(p, r)
    if "diff" in p:
        return p["diff"].reshape(shape)
    if "hada_w1_a" in p:
        r = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            w = _cp(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * _cp(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            w = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return w.reshape(shape) * _scale(p, r)
    if any(k.startswith("lokr_") for k in p):
        rank = None
        if "lokr_w1" in p:
            w1 = p["lokr_w1"]
        else:
            w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2, rank = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]), p["lokr_w2_b"].shape[0]
        else:
            w2, rank = p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(shape) * _scale(p, rank)
    raise ValueError(f"no conv update in parts {sorted(p)}")


def lora_weights(loras: LoraFile | Sequence[LoraFile], shapes: Mapping[str, Sequence[int]],
                 strengths: Sequence[float] | None = None, unet_config=None) -> SuspectWeights:
    """ΔW per module of ``shapes`` (``{module path: weight shape}``, e.g. every Linear and Conv2d of the UNet) for
    the files loaded together at ``strengths`` (default 1 each), as a frontend applies them (module docstring).

    A layer whose update does not fit the model's layer is an error naming the file (another base model).
    """
    loras = [loras] if isinstance(loras, LoraFile) else list(loras)
    strengths = [1.0] * len(loras) if strengths is None else [float(s) for s in strengths]
    if len(strengths) != len(loras):
        raise UserError(f"{len(strengths)} strengths for {len(loras)} LoRA files")
    names = candidate_names(list(shapes), unet_config)
    out = SuspectWeights(files=[lf.path for lf in loras])

    def add(target: dict, module: str, value: torch.Tensor, strength: float) -> None:
        value = value * strength
        target[module] = target[module] + value if module in target else value

    for lf, strength in zip(loras, strengths):
        skipped: dict[str, int] = {}
        stems = [*lf.entries, *lf.deltas, *lf.conv, *lf.bias]
        for stem in dict.fromkeys(stems):
            module = names.get(stem)
            if module is None:
                what = "text-encoder layers" if _is_te_stem(stem) else "UNet layers under names this model lacks"
                skipped[what] = skipped.get(what, 0) + 1
                continue
            shape = tuple(shapes[module])
            where = f"{lf.path}: {stem}"
            if stem in lf.entries:
                down, up = lf.entries[stem]
                w = up.double() @ down.double()
            elif stem in lf.deltas:
                w = lf.deltas[stem].double()
            elif stem in lf.conv:
                try:
                    w = conv_delta(lf.conv[stem], shape)
                except (RuntimeError, ValueError, KeyError) as exc:
                    raise UserError(f"{where}: its conv update does not fit the model's layer {shape} "
                                    f"(another base model?): {exc}") from None
            else:
                w = None
            if w is not None:
                if len(shape) == 4 and w.dim() == 2 and w.numel() == math.prod(shape):
                    w = w.reshape(shape)  # LoHa/LoKr/full on a conv with flattened kernels, as frontends reshape
                if tuple(w.shape) != shape:
                    raise UserError(f"{where}: update of shape {tuple(w.shape)}, the model's layer is {shape} "
                                    "(another base model?)")
                add(out.deltas, module, w, strength)
            if stem in lf.bias:
                add(out.bias, module, lf.bias[stem].double().reshape(-1), strength)
        name = os.path.basename(lf.path) if lf.path else "suspect"
        out.not_applied += [f"{name}: {n} {what}" for what, n in skipped.items()]
        out.not_applied += [f"{name}: {n} {what}" for what, n in lf.other.items() if not what.startswith("conv layers")]
    if not out.deltas and not out.bias:
        files = ", ".join(out.files) or "suspect"
        raise UserError(f"{files}: none of its layers match the base model's UNet (wrong base?)")
    return out


def unet_shapes(unet) -> dict[str, tuple[int, ...]]:
    """``{module path: weight shape}`` of every Linear and Conv2d of a UNet (what a LoRA can patch)."""
    return {n: tuple(m.weight.shape) for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def read_suspects(paths: str | os.PathLike | Sequence) -> list[LoraFile]:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [p if isinstance(p, LoraFile) else read_lora(p) for p in paths]


@torch.no_grad()
def apply_weights(unet, weights: SuspectWeights) -> dict[str, torch.Tensor]:
    """Add the updates to ``unet`` in place; returns the original tensors (``{param name: tensor}``) to restore."""
    originals: dict[str, torch.Tensor] = {}
    for kind, updates in (("weight", weights.deltas), ("bias", weights.bias)):
        for module, delta in updates.items():
            param = getattr(unet.get_submodule(module), kind, None)
            if param is None or param.numel() != delta.numel():
                raise UserError(f"{module}: the suspect updates its {kind}, which this model's layer "
                                f"{'lacks' if param is None else 'has another shape'}")
            originals[f"{module}.{kind}"] = param.detach().clone()
            param.add_(delta.reshape(param.shape).to(param.device, param.dtype))
    return originals


@torch.no_grad()
def restore(unet, originals: Mapping[str, torch.Tensor]) -> None:
    for name, value in originals.items():
        module, _, kind = name.rpartition(".")
        getattr(unet.get_submodule(module), kind).copy_(value)


def merge_suspect_into(unet, paths, strengths: Sequence[float] | None = None) -> tuple[dict, SuspectWeights]:
    """Load LoRA file(s) into ``unet`` as a frontend does (at ``strengths``); (originals for :func:`restore`, what
    was applied)."""
    weights = lora_weights(read_suspects(paths), unet_shapes(unet), strengths)
    return apply_weights(unet, weights), weights
