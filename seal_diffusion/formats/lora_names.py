"""Module names across LoRA layouts: diffusers paths, LDM (CompVis/SGM) paths and kohya stems.

The key stores every adapted layer under its diffusers module path (``down_blocks.0.attentions.0.transformer_blocks.0
.attn1.to_q``). Frontends name the same layer differently:

* kohya, diffusers names: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``
* kohya, LDM names (A1111/ComfyUI, many kohya SD 1.5 files):
  ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``
* ComfyUI's native form: ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q``

Text-encoder layers (``--train_text_encoder``) are stored in the key as ``text_encoder.<path in CLIPTextModel>`` (SDXL's
second encoder: ``text_encoder_2.<path>``), which is also their diffusers-layout name. kohya names them
``lora_te_<path with _>`` for SD 1.x, ``lora_te1_…`` / ``lora_te2_…`` for SDXL's two encoders — the prefixes diffusers'
kohya converter, ComfyUI's ``model_lora_keys_clip`` and A1111's ``networks.py`` map; reading also accepts ``lora_te1_``
for an SD 1.x encoder, as diffusers and ComfyUI do.

kohya stems cannot be split back into a path ('_' is both separator and part of ``to_q``), so — as ComfyUI's key map
does — every candidate name is generated from the key's own module paths and looked up.

The diffusers → LDM mapping of a block is derived from the UNet's real layout, the way diffusers' single-file
conversion and kohya's conversion do it: with ``L_i`` layers at down level ``i``, down level ``i`` layer ``j`` is
``input_blocks.{1 + Σ_{k<i}(L_k+1) + j}`` (index 0 is ``conv_in``; each level but the last ends in a downsampler
slot), its attention is sub-module ``.1``; ``mid_block.attentions.0`` is ``middle_block.1``; up level ``i`` has
``L'_i + 1`` layers at ``output_blocks.{Σ_{k<i}(L'_k+1) + j}.1`` with ``L'`` the reversed list. ``L`` comes from the
UNet config (``layers_per_block``) when one is given, else from the key's own module paths (the highest
``up_blocks.i.attentions.j`` index is ``L_i'``, the highest down index ``L_i − 1``): those paths are the modules found
in the real UNet at training time. The same formulas give SDXL's names (3 levels, attention from level 1 on).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the key's module-name prefixes of the two CLIP text encoders
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # the projections of every CLIPAttention


def kohya_stem(module: str) -> str:
    """``lora_unet_`` + the path with '.' → '_' (kohya's naming, for either path style)."""
    return "lora_unet_" + module.replace(".", "_")


def is_text_encoder_module(module: str) -> bool:
    """Whether a key module name is a text-encoder layer (``text_encoder.…`` / ``text_encoder_2.…``)."""
    return module.partition(".")[0] in TEXT_ENCODERS


def unet_modules(modules: Iterable[str]) -> list[str]:
    """The UNet modules among key module names (text-encoder layers dropped), in order."""
    return [m for m in modules if not is_text_encoder_module(m)]


def text_encoder_stems(module: str) -> list[str]:
    """The kohya stems a text-encoder module goes by: ``lora_te_``/``lora_te1_`` (first encoder), ``lora_te2_``."""
    encoder, _, path = module.partition(".")
    body = path.replace(".", "_")
    return [f"lora_te2_{body}"] if encoder == "text_encoder_2" else [f"lora_te_{body}", f"lora_te1_{body}"]


def layers_from_config(config: Mapping) -> tuple[list[int], list[int]]:
    """(layers per down level, layers per up level) from a diffusers UNet config."""
    n = len(config["down_block_types"])
    lpb = config["layers_per_block"]
    down = [int(lpb)] * n if isinstance(lpb, int) else [int(x) for x in lpb]
    up = [x + 1 for x in reversed(down)]
    return down, up


def layers_from_modules(modules: Iterable[str]) -> tuple[list[int], list[int]]:
    """(layers per down level, layers per up level) as far as the attention paths show them.

    A level without attention shows nothing: it gets the common count (SD's levels all have the same one). Up levels
    have one layer more than the down level they mirror.
    """
    down: dict[int, int] = {}
    up: dict[int, int] = {}
    for m in modules:
        if (g := _DOWN.match(m)):
            down[int(g[1])] = max(down.get(int(g[1]), 0), int(g[2]) + 1)
        elif (g := _UP.match(m)):
            up[int(g[1])] = max(up.get(int(g[1]), 0), int(g[2]) + 1)
    common = max([*down.values(), *(v - 1 for v in up.values()), 1])
    n = max([*(k + 1 for k in down), *(k + 1 for k in up), 1])
    return [down.get(i, common) for i in range(n)], [up.get(i, common + 1) for i in range(n)]


def ldm_path(module: str, down: list[int], up: list[int]) -> str | None:
    """The LDM path of a diffusers attention-module path (``None`` outside the attention blocks)."""
    if (g := _DOWN.match(module)):
        i, j = int(g[1]), int(g[2])
        if i >= len(down):
            return None
        return f"input_blocks.{1 + sum(x + 1 for x in down[:i]) + j}.1.{g[3]}"
    if (g := _MID.match(module)):
        return f"middle_block.1.{g[1]}"
    if (g := _UP.match(module)):
        i, j = int(g[1]), int(g[2])
        if i >= len(up):
            return None
        return f"output_blocks.{sum(up[:i]) + j}.1.{g[3]}"
    return None


def ldm_names(modules: Iterable[str], unet_config: Mapping | None = None) -> dict[str, str]:
    """``{diffusers path: LDM path}`` for the attention modules among ``modules``."""
    modules = list(modules)
    down, up = layers_from_config(unet_config) if unet_config is not None else layers_from_modules(modules)
    out = {}
    for m in modules:
        ldm = ldm_path(m, down, up)
        if ldm is not None:
            out[m] = ldm
    return out


def candidate_names(modules: Iterable[str], unet_config: Mapping | None = None) -> dict[str, str]:
    """``{name a file may use: diffusers path}``: the path itself, its kohya stem, its LDM path and LDM kohya stem.

    Without a config the result is cached per module list (``scan`` asks once per file and key); do not modify it.
    """
    if unet_config is None:
        return _candidate_names_cached(tuple(modules))
    return _candidate_names(list(modules), unet_config)


@functools.lru_cache(maxsize=32)
def _candidate_names_cached(modules: tuple[str, ...]) -> dict[str, str]:
    return _candidate_names(list(modules), None)


def _candidate_names(modules: list[str], unet_config: Mapping | None) -> dict[str, str]:
    ldm = ldm_names(unet_modules(modules), unet_config)
    out: dict[str, str] = {}
    for m in modules:
        out[m] = m
        if is_text_encoder_module(m):
            out.update((stem, m) for stem in text_encoder_stems(m))
            continue
        out[kohya_stem(m)] = m
        if m in ldm:
            out[ldm[m]] = m
            out[kohya_stem(ldm[m])] = m
    return out


# -- the names and metadata a kohya file uses, per base-model family ---------------------------------------------------
# kohya's ss_base_model_version values; the key records one of them (SealKey.architecture).
SD_V1, SDXL = "sd_v1", "sdxl_base_v1-0"
ARCHITECTURE_METADATA = {
    SD_V1: {"ss_base_model_version": SD_V1, "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-v1/lora"},
    SDXL: {"ss_base_model_version": SDXL, "ss_v2": "False",
           "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
}


def kohya_names(modules: Iterable[str], architecture: str = SD_V1) -> dict[str, str]:
    """``{diffusers path: kohya stem}`` as kohya writes it for the family.

    Text-encoder modules: ``lora_te_<path>`` for SD 1.x, ``lora_te1_``/``lora_te2_`` for SDXL's two encoders.

    SD 1.x: ``lora_unet_`` + the diffusers path (what kohya's SD 1.5 files and our contract use). SDXL: ``lora_unet_`` +
    the original SGM path (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), as kohya sd-scripts' SDXL LoRAs and
    ComfyUI's SDXL key map name them; derived from the modules' own block layout (:func:`ldm_names`).
    """
    modules = list(modules)
    if architecture not in ARCHITECTURE_METADATA:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURE_METADATA)}")
    te = {m: text_encoder_stems(m)[0 if architecture == SD_V1 else -1] for m in modules if is_text_encoder_module(m)}
    unet = unet_modules(modules)
    if architecture == SD_V1:
        names = {m: kohya_stem(m) for m in unet}
    else:
        ldm = ldm_names(unet)
        missing = [m for m in unet if m not in ldm]
        if missing:
            raise ValueError(f"{missing[0]}: not an attention module of the UNet's blocks; no SGM name for it")
        names = {m: kohya_stem(ldm[m]) for m in unet}
    return {m: names[m] if m in names else te[m] for m in modules}
