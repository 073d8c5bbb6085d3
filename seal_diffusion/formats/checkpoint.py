"""Export a diffusers Stable Diffusion 1.x or SDXL pipeline as an original (LDM / SGM) single-file checkpoint.

A1111, ComfyUI and most other tools load SD 1.x models as one ``.safetensors`` file in the layout of the original
CompVis ``LatentDiffusion`` module: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder). SDXL files (Stability's SGM layout) keep the UNet
and VAE names (plus ``label_emb.0.*``, the added time/text embedding) and hold two text encoders:
``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, transformers naming) and
``conditioner.embedders.1.model.*`` (OpenCLIP-G in open_clip naming: ``transformer.resblocks.N.attn.in_proj_weight``
with q, k, v concatenated, ``ln_final``, ``text_projection`` stored transposed, ``positional_embedding``,
``token_embedding``). This module is the inverse of diffusers' own ``convert_ldm_unet_checkpoint`` /
``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint`` (in
``diffusers.loaders.single_file_utils``), so that

    StableDiffusionPipeline.from_single_file(path, config=<diffusers folder of the same architecture>)

(``StableDiffusionXLPipeline`` for SDXL) gives back exactly the same weights. The key mapping is derived from the model configs (number of levels,
``layers_per_block``), not hard-coded for SD 1.5's four levels, so the tiny SD-shaped test model converts as well.

Only the SD 1.x / SDXL building blocks are supported (``CrossAttnDownBlock2D``/``DownBlock2D``,
``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``/``UpBlock2D``, SDXL's ``text_time`` added embedding; a KL VAE;
a ``CLIPTextModel``, and for SDXL a ``CLIPTextModelWithProjection`` as the second encoder). Any weight without an LDM counterpart raises
:class:`~seal_diffusion.errors.UserError` instead of being silently dropped.

The returned dicts hold the models' own tensors (no copies); the VAE attention weights are reshaped views.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileio import save_safetensors_atomic

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UNET_UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}
_UNET_MID_TYPES = {"UNetMidBlock2DCrossAttn"}
_VAE_DOWN_TYPES = {"DownEncoderBlock2D"}
_VAE_UP_TYPES = {"UpDecoderBlock2D"}

# ResnetBlock2D parameter names -> LDM ResBlock names (UNet)
_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# ResnetBlock2D parameter names -> LDM ResnetBlock names (VAE); the rest (norm1, conv1, ...) are identical
_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
# diffusers VAE Attention -> LDM AttnBlock; q/k/v/proj_out are 1x1 convolutions there
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _config_dict(config: Any) -> dict[str, Any]:
    """Accept a config mapping (``model.config``), or a model that carries ``.config``."""
    if isinstance(config, Mapping):
        return dict(config)
    inner = getattr(config, "config", None)
    if isinstance(inner, Mapping):
        return dict(inner)
    raise TypeError(f"expected a model config mapping, got {type(config).__name__}")


def _layers_per_block(config: Mapping[str, Any], what: str) -> int:
    """``layers_per_block`` as one int (LDM checkpoints use the same count at every level)."""
    value = config["layers_per_block"]
    if isinstance(value, int):
        return value
    values = set(value)
    if len(values) != 1:
        raise UserError(f"{what}: layers_per_block={tuple(value)} differs per level; LDM checkpoints need one count")
    return values.pop()


def _check_block_types(types: Iterable[str], allowed: set[str], field: str, what: str) -> list[str]:
    types = list(types)
    bad = sorted(set(types) - allowed)
    if bad:
        raise UserError(
            f"{what}: {field} {bad} not supported by the SD 1.x single-file layout (allowed: {sorted(allowed)})"
        )
    return types


def _rename_first(rest: str, renames: Mapping[str, str]) -> str:
    """Rename the leading module name of ``rest`` (e.g. ``conv1.weight`` -> ``in_layers.2.weight``)."""
    for old, new in renames.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _apply_prefix_map(
    state_dict: Mapping[str, torch.Tensor],
    prefix_map: Mapping[str, tuple[str, Mapping[str, str]]],
    what: str,
) -> dict[str, torch.Tensor]:
    """Map every key through the longest matching diffusers prefix; unmapped keys are an error.

    ``prefix_map`` maps a diffusers module prefix (ending in ``.``) or an exact key to ``(ldm_prefix, renames)``,
    where ``renames`` renames the first module name below the prefix.
    """
    # longest first, so "mid_block.resnets.1." wins over a hypothetical shorter prefix
    prefixes = sorted(prefix_map, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
                ldm_prefix, renames = prefix_map[prefix]
                out[ldm_prefix + _rename_first(key[len(prefix) :], renames)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        raise UserError(f"{what}: {len(unmapped)} weights have no SD 1.x single-file (LDM) name: {shown}")
    return out


def unet_to_ldm(unet_state_dict: Mapping[str, torch.Tensor], unet_config: Any) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM names, prefixed ``model.diffusion_model.``.

    With ``n`` levels and ``L = layers_per_block``: ``input_blocks.0.0`` is ``conv_in``; level ``i`` layer ``j`` is
    ``input_blocks.{1 + i(L+1) + j}`` (``.0`` resnet, ``.1`` attention) and its downsampler
    ``input_blocks.{(i+1)(L+1)}.0.op``; ``middle_block.0/1/2`` are resnet/attention/resnet; up level ``i`` (``L+1``
    layers) is ``output_blocks.{i(L+1) + j}`` with the upsampler after the last layer's resnet (and attention, if any).
    """
    config = _config_dict(unet_config)
    what = "UNet"
    down_types = _check_block_types(config["down_block_types"], _UNET_DOWN_TYPES, "down_block_types", what)
    up_types = _check_block_types(config["up_block_types"], _UNET_UP_TYPES, "up_block_types", what)
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    _check_block_types([mid_type], _UNET_MID_TYPES, "mid_block_type", what)
    if len(down_types) != len(up_types):
        raise UserError(f"{what}: {len(down_types)} down blocks but {len(up_types)} up blocks")
    layers = _layers_per_block(config, what)
    none: Mapping[str, str] = {}
    resnet = _UNET_RESNET_RENAMES

    prefix_map: dict[str, tuple[str, Mapping[str, str]]] = {
        "conv_in.": ("input_blocks.0.0.", none),
        "time_embedding.linear_1.": ("time_embed.0.", none),
        "time_embedding.linear_2.": ("time_embed.2.", none),
        "conv_norm_out.": ("out.0.", none),
        "conv_out.": ("out.2.", none),
        "mid_block.resnets.0.": ("middle_block.0.", resnet),
        "mid_block.attentions.0.": ("middle_block.1.", none),
        "mid_block.resnets.1.": ("middle_block.2.", resnet),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop ids → label_emb
        prefix_map["add_embedding.linear_1."] = ("label_emb.0.0.", none)
        prefix_map["add_embedding.linear_2."] = ("label_emb.0.2.", none)
    for i in range(len(down_types)):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            prefix_map[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{block}.0.", resnet)
            prefix_map[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{block}.1.", none)
        prefix_map[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", none)
    for i in range(len(up_types)):
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            prefix_map[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{block}.0.", resnet)
            prefix_map[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{block}.1.", none)
        # the upsampler follows the last layer's resnet, and its attention when the level has one
        last = i * (layers + 1) + layers
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.{layers}.") for k in unet_state_dict)
        upsampler = f"output_blocks.{last}.{2 if has_attention else 1}.conv."
        prefix_map[f"up_blocks.{i}.upsamplers.0.conv."] = (upsampler, none)

    mapped = _apply_prefix_map(unet_state_dict, prefix_map, what)
    return {UNET_PREFIX + k: v for k, v in mapped.items()}


def _vae_attention_to_conv(key: str, value: torch.Tensor) -> torch.Tensor:
    """LDM ``AttnBlock`` q/k/v/proj_out are 1x1 convs: a Linear ``[C, C]`` weight becomes ``[C, C, 1, 1]``."""
    if key.endswith(".weight") and ".mid.attn_1." in key and not key.endswith(".norm.weight") and value.ndim == 2:
        return value.reshape(*value.shape, 1, 1)
    return value


def vae_to_ldm(vae_state_dict: Mapping[str, torch.Tensor], vae_config: Any) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM names, prefixed ``first_stage_model.``.

    Encoder level ``i`` is ``encoder.down.{i}``; decoder up block ``i`` is ``decoder.up.{n-1-i}`` (LDM numbers the
    decoder levels from the lowest resolution's opposite end). Mid blocks become ``mid.block_1``/``mid.attn_1``/
    ``mid.block_2``, ``conv_norm_out`` becomes ``norm_out`` and ``conv_shortcut`` becomes ``nin_shortcut``.
    """
    config = _config_dict(vae_config)
    what = "VAE"
    down_types = _check_block_types(config["down_block_types"], _VAE_DOWN_TYPES, "down_block_types", what)
    up_types = _check_block_types(config["up_block_types"], _VAE_UP_TYPES, "up_block_types", what)
    layers = _layers_per_block(config, what)
    none: Mapping[str, str] = {}
    resnet = _VAE_RESNET_RENAMES

    prefix_map: dict[str, tuple[str, Mapping[str, str]]] = {
        "quant_conv.": ("quant_conv.", none),
        "post_quant_conv.": ("post_quant_conv.", none),
    }
    for part in ("encoder", "decoder"):
        prefix_map[f"{part}.conv_in."] = (f"{part}.conv_in.", none)
        prefix_map[f"{part}.conv_out."] = (f"{part}.conv_out.", none)
        prefix_map[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", none)
        prefix_map[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", resnet)
        prefix_map[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", resnet)
        prefix_map[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION_RENAMES)
    for i in range(len(down_types)):
        for j in range(layers):
            prefix_map[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", resnet)
        prefix_map[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", none)
    n_up = len(up_types)
    for i in range(n_up):
        level = n_up - 1 - i
        for j in range(layers + 1):
            prefix_map[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{level}.block.{j}.", resnet)
        prefix_map[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{level}.upsample.conv.", none)

    mapped = _apply_prefix_map(vae_state_dict, prefix_map, what)
    return {VAE_PREFIX + k: _vae_attention_to_conv(k, v) for k, v in mapped.items()}


def text_encoder_to_ldm(te_state_dict: Mapping[str, torch.Tensor], prefix: str = TEXT_ENCODER_PREFIX
                        ) -> dict[str, torch.Tensor]:
    """Prefix a ``CLIPTextModel`` state dict for SD 1.x: ``cond_stage_model.transformer.text_model.*`` (SDXL's first
    encoder: ``prefix=SDXL_TEXT_ENCODER_PREFIX``).

    Newer transformers versions drop the ``text_model.`` level from ``CLIPTextModel``; it is added back here, since
    SD 1.x checkpoints (and diffusers' detection of them) use it. The non-persistent ``position_ids`` buffer, present
    in state dicts of older transformers versions, is left out: loaders recreate it.
    """
    top_level = ("embeddings.", "encoder.", "final_layer_norm.")
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in te_state_dict.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids"):
            continue
        if not name.startswith(top_level):
            unknown.append(key)
            continue
        out[f"{prefix}text_model.{name}"] = value
    if unknown:
        raise UserError(f"text encoder: weights outside a CLIPTextModel (SD 1.x) layout: {', '.join(unknown[:5])}")
    return out


# open_clip's names for one transformer block's parts (diffusers/transformers name -> open_clip name)
_OPEN_CLIP_BLOCK_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def open_clip_to_ldm(te_state_dict: Mapping[str, torch.Tensor], prefix: str = SDXL_OPEN_CLIP_PREFIX
                     ) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict (SDXL's second encoder) in open_clip naming under ``prefix``.

    q/k/v projections become one ``attn.in_proj_weight``/``in_proj_bias`` (concatenated in that order, as
    ``nn.MultiheadAttention`` stores them); ``text_projection`` is stored transposed (open_clip multiplies
    ``x @ text_projection``). New tensors are made only for those two; everything else is the model's own.
    """
    sd = {k.removeprefix("text_model."): v for k, v in te_state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    singles = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in singles:
            out[prefix + singles[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            layer, _, rest = key[len("encoder.layers."):].partition(".")
            block = f"{prefix}transformer.resblocks.{layer}."
            for proj in ("q", "k", "v"):
                if rest.startswith(f"self_attn.{proj}_proj."):
                    qkv.setdefault(block + "attn.in_proj_" + rest.rpartition(".")[2], {})[proj] = value
                    break
            else:
                renamed = _rename_first_prefix(rest, _OPEN_CLIP_BLOCK_RENAMES)
                if renamed is None:
                    unknown.append(key)
                else:
                    out[block + renamed] = value
        else:
            unknown.append(key)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(key)
            continue
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    if unknown:
        raise UserError(f"text encoder 2: weights outside an OpenCLIP (SDXL) layout: {', '.join(unknown[:5])}")
    return out


def _rename_first_prefix(rest: str, renames: Mapping[str, str]) -> str | None:
    for old, new in renames.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def is_sdxl_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` has SDXL's second text encoder (then the single file uses the SGM layout)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole checkpoint of ``pipe`` in single-file naming: SD 1.x (UNet, VAE, text encoder) or SDXL (UNet, VAE,
    CLIP-L, OpenCLIP-G)."""
    xl = is_sdxl_pipeline(pipe)
    needed = ("unet", "vae", "text_encoder", "text_encoder_2") if xl else ("unet", "vae", "text_encoder")
    for name in needed:
        if getattr(pipe, name, None) is None:
            raise UserError(f"pipeline has no {name}; a{'n SDXL' if xl else ' SD 1.x'} single-file checkpoint needs "
                            f"{', '.join(needed)}")
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    tensors.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if xl:
        tensors.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), SDXL_TEXT_ENCODER_PREFIX))
        tensors.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
    else:
        tensors.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    return tensors


def save_single_file(pipe: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``pipe`` as one LDM-layout ``.safetensors`` checkpoint (atomically); returns ``path``.

    Load it back with ``StableDiffusionPipeline.from_single_file(path, config=<diffusers folder>)``
    (``StableDiffusionXLPipeline`` for an SDXL pipeline).
    """
    tensors = pipeline_to_ldm(pipe)
    return save_safetensors_atomic(tensors, path, metadata={"format": "pt"}, overwrite=overwrite, what="checkpoint")


def is_ldm_checkpoint(keys: Iterable[str]) -> bool:
    """Whether state-dict ``keys`` look like an original LDM single-file SD checkpoint.

    True when some key starts with ``model.diffusion_model.`` (the LDM UNet). Diffusers-format weights
    (``down_blocks.*``), LoRA files and VAE-only files are not.
    """
    return any(key.startswith(UNET_PREFIX) for key in keys)
