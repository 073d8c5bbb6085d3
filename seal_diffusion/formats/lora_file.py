"""Public LoRA files in the two layouts frontends read, and reading any LoRA file back.

* ``diffusers``: ``unet.<module>.lora_A.weight`` (r×in) / ``unet.<module>.lora_B.weight`` (out×r), the PEFT keys that
  ``pipe.load_lora_weights`` reads; no alpha, so the scale is folded into lora_B (diffusers assumes alpha = r).
  Text-encoder layers: ``text_encoder.<path>.lora_A.weight`` (SDXL's second encoder ``text_encoder_2.…``).
* ``kohya``: ``lora_unet_<module with '.'→'_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (= rank) plus
  the ``ss_*``/``modelspec.*`` metadata that ComfyUI, A1111 and LoRA managers read. Text-encoder layers:
  ``lora_te_<path>`` (SD 1.x), ``lora_te1_``/``lora_te2_`` (SDXL), see :mod:`seal_diffusion.formats.lora_names`.

What gets written is exactly what a LoRA trainer of that rank writes: no passport, raw factor, secret, seed, or any word
naming the method. :func:`read_lora` reads every layout that diffusers, ComfyUI or A1111 load (kohya stems with
diffusers or LDM names, PEFT keys with or without prefixes, ``lora.down``/``lora.up``, diffusers' old
attention-processor keys, LyCORIS LoCon/LoHa/LoKr/full) and returns the effective (down, up·alpha/r) factors — or the
full ΔW — of every UNet and text-encoder attention layer, for verification and attacks; the rest (conv layers, text
-encoder layers under other prefixes) is counted and reported, not tested.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import load_safetensors, save_safetensors_atomic
from .lora_names import (ARCHITECTURE_METADATA, SD_V1, candidate_names, is_text_encoder_module,  # noqa: F401
                         kohya_names, kohya_stem, ldm_names)
from .kohya_meta import IMPLEMENTATION, SAI_MODEL_SPEC, with_hashes

LAYOUTS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class LoraFile:
    """A LoRA as read from disk: ``entries[stem] = (down r×in, up out×r)`` with any alpha/r scale folded into up.

    ``stem`` is the layer's name in the file with the layout's suffixes and ``unet.``-style prefixes removed: a
    ``lora_unet_…`` kohya stem (layout ``kohya``) or a dotted path, diffusers or LDM (layout ``diffusers``); text-encoder
    layers keep their prefix (``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``, ``text_encoder.…``, ``text_encoder_2.…``).
    :meth:`by_module` maps stems to the key's module paths (:mod:`seal_diffusion.formats.lora_names`). ``deltas`` holds full
    ΔW of layers that are not plain low-rank (LyCORIS LoHa/LoKr/full); ``dialect`` names the key styles seen;
    ``other`` counts parts present but not tested (text encoder, conv layers, unknown tensors).
    """

    layout: str
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    dialect: str = ""
    other: dict[str, int] = field(default_factory=dict)
    conv: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # raw parts of conv layers (LoCon, LyCORIS)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # LyCORIS full's bias updates (``diff_b``)

    @property
    def rank(self) -> int:
        return max((d.shape[0] for d, _ in self.entries.values()), default=0)

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the entries back under their own stems (kohya names for ``lora_unet_`` stems, else PEFT keys)."""
        path = Path(path)
        if self.layout == "diffusers" and (path.is_dir() or path.suffix == ""):
            path = path / DIFFUSERS_WEIGHT_NAME
        tensors: dict[str, torch.Tensor] = {}
        for stem, (down, up) in self.entries.items():
            if not stem.startswith(_KOHYA_PREFIXES):
                prefix = "" if _is_te_stem(stem) else "unet."
                tensors[f"{prefix}{stem}.lora_A.weight"] = down
                tensors[f"{prefix}{stem}.lora_B.weight"] = up
            else:
                tensors[f"{stem}.lora_down.weight"] = down
                tensors[f"{stem}.lora_up.weight"] = up
                tensors[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
        for stem, delta in self.deltas.items():
            tensors[f"{stem}.diff"] = delta
        metadata = dict(self.metadata)
        if self.layout == "kohya" and self.entries:
            metadata["ss_network_dim"] = str(self.rank)
            metadata["ss_network_alpha"] = str(float(self.rank))
            metadata = with_hashes(tensors, metadata)  # the tensors changed: so do the hashes
        return save_safetensors_atomic(tensors, path, metadata, overwrite=overwrite, what="LoRA file")

    def _mapped(self, stems, module_names, unet_config=None) -> dict[str, list[str]]:
        names = candidate_names(module_names, unet_config)
        out: dict[str, list[str]] = {}
        for stem in stems:
            if stem in names:
                out.setdefault(names[stem], []).append(stem)
        return out

    def by_module(self, module_names, unet_config=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module path: (down, up)}`` for the given module paths that the file holds, under any naming.

        A layer named twice (diffusers and LDM names) gets both updates added, as ComfyUI applies both.
        """
        module_names = list(module_names)
        mapped = self._mapped(self.entries, module_names, unet_config)
        out = {}
        for m in module_names:
            stems = mapped.get(m)
            if stems:
                out[m] = _add_factors([self.entries[s] for s in stems])
        return out

    def deltas_by_module(self, module_names, unet_config=None) -> dict[str, torch.Tensor]:
        """``{module path: ΔW}`` for the full-ΔW layers (LyCORIS LoHa/LoKr/full) of the given modules."""
        mapped = self._mapped(self.deltas, list(module_names), unet_config)
        return {m: sum(self.deltas[s] for s in stems) for m, stems in mapped.items()}

    def naming(self) -> str:
        """How the file names its layers: ``diffusers names``, ``LDM names`` or both."""
        kinds = set()
        for stem in [*self.entries, *self.deltas]:
            if _is_te_stem(stem):
                kinds.add("text-encoder layers")
                continue
            body = stem[len("lora_unet_"):] if stem.startswith("lora_unet_") else stem
            kinds.add("LDM names" if body.startswith(("input_blocks", "middle_block", "output_blocks"))
                      else "diffusers names")
        return " + ".join(sorted(kinds))

    def not_tested(self, module_names, unet_config=None) -> list[str]:
        """Human-readable list of the parts of the file the test does not look at."""
        used = {s for stems in self._mapped([*self.entries, *self.deltas], list(module_names), unet_config).values()
                for s in stems}
        unused = [s for s in [*self.entries, *self.deltas] if s not in used]
        te = len([s for s in unused if _is_te_stem(s)])
        rest = len(unused) - te
        notes = [f"{n} {what}" for what, n in self.other.items()]
        if te:
            notes.append(f"{te} text-encoder layers that are not in the key (trained without --train_text_encoder, "
                         "or other layers)")
        if rest:
            notes.append(f"{rest} UNet layers that are not in the key (feed-forward, proj_in/out, …)")
        return notes


def _add_factors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) whose product is the sum of the pairs' products (ranks stacked)."""
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([d for d, _ in pairs], 0), torch.cat([u for _, u in pairs], 1)


def lora_tensors(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str, name: str = "lora", architecture: str = SD_V1
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a public file from ``{module: (A′, B′)}`` (scale already in B′).

    ``architecture`` (``sd_v1`` | ``sdxl_base_v1-0``) picks the kohya names (SDXL: SGM block names) and metadata.
    """
    if layout not in LAYOUTS:
        raise UserError(f"--format {layout!r}: expected one of {', '.join(LAYOUTS)}")
    tensors: dict[str, torch.Tensor] = {}
    ranks = {a.shape[0] for a, _ in factors.values()}
    rank = max(ranks)
    if layout == "diffusers":
        for module, (a, b) in factors.items():
            prefix = "" if is_text_encoder_module(module) else "unet."  # text_encoder.… / text_encoder_2.… as is
            tensors[f"{prefix}{module}.lora_A.weight"] = a
            tensors[f"{prefix}{module}.lora_B.weight"] = b
        return tensors, {"format": "pt"}
    stems = kohya_names(factors, architecture)
    for module, (a, b) in factors.items():
        stem = stems[module]
        tensors[f"{stem}.lora_down.weight"] = a
        tensors[f"{stem}.lora_up.weight"] = b
        tensors[f"{stem}.alpha"] = torch.tensor(float(a.shape[0]))  # alpha = rank → scale 1, B′ carries α/r
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        **ARCHITECTURE_METADATA[architecture],
        "ss_output_name": name,
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.implementation": IMPLEMENTATION[architecture],
        "modelspec.title": name,
    }
    return tensors, metadata


def write_lora(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    layout: str,
    name: str = "lora",
    *,
    overwrite: bool = True,
    architecture: str = SD_V1,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a public LoRA atomically. ``path`` may be a folder for the diffusers layout. ``architecture``: the base
    model family (kohya names and metadata, see :func:`lora_tensors`). ``metadata``: training facts for the kohya
    layout (:func:`seal_diffusion.formats.kohya_meta.training_metadata`); hashes are added here."""
    path = Path(path)
    if layout == "diffusers" and (path.is_dir() or path.suffix == ""):
        path = path / DIFFUSERS_WEIGHT_NAME
    tensors, base_metadata = lora_tensors(factors, layout, name, architecture)
    if layout == "kohya":
        metadata = with_hashes(tensors, {**base_metadata, **(metadata or {})})
    else:
        metadata = base_metadata
    return save_safetensors_atomic(tensors, path, metadata, overwrite=overwrite, what="LoRA file")


def resolve_lora_path(path: str | os.PathLike) -> Path:
    """A LoRA file, or a diffusers folder holding ``pytorch_lora_weights.safetensors``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / DIFFUSERS_WEIGHT_NAME
        if candidate.is_file():
            return candidate
        raise UserError(f"{path}: folder has no {DIFFUSERS_WEIGHT_NAME}")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{path}: pickle files are refused (loading them can run code); use .safetensors")
    return path


# -- reading every layout frontends load --------------------------------------------------------------------------
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                          "te_", "te1_", "te2_", "text_model.")
_READ_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")  # read as entries
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def _is_te_stem(stem: str) -> bool:
    return stem.startswith(_READ_TE_PREFIXES)


_UNET_PREFIXES = ("unet.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
# suffix → (part, dialect of a dotted stem); kohya stems are always "kohya"
_SUFFIXES = (
    (".lora_down.weight", "down", "kohya-style lora_down/lora_up"),
    (".lora_up.weight", "up", "kohya-style lora_down/lora_up"),
    (".lora_A.weight", "down", "PEFT lora_A/lora_B"),
    (".lora_B.weight", "up", "PEFT lora_A/lora_B"),
    (".lora.down.weight", "down", "diffusers lora.down/lora.up"),
    (".lora.up.weight", "up", "diffusers lora.down/lora.up"),
    (".lora_linear_layer.down.weight", "down", "diffusers lora_linear_layer"),
    (".lora_linear_layer.up.weight", "up", "diffusers lora_linear_layer"),
    (".alpha", "alpha", ""),
    (".dora_scale", "dora", ""),
    (".lora_magnitude_vector", "dora", ""),
)
_LYCORIS_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                  "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "lora_mid.weight",
                  "w_norm", "b_norm", "oft_blocks", "oft_diag", "rescale", "bias_indices", "bias_values"}
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\.(down|up)\.weight$")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(stem, part, dialect) of a UNet tensor name, or None when it is not a LoRA part this reader knows."""
    for prefix in _UNET_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if (g := _PROCESSOR.match(key)):
        proj = "to_out.0" if g[2] == "to_out" else g[2]
        return f"{g[1]}.{proj}", g[3], "diffusers attention processor (to_q_lora.down)"
    for suffix, part, dialect in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            return stem, part, "kohya" if stem.startswith(_KOHYA_PREFIXES) else dialect
    stem, _, part = key.rpartition(".")
    if part == "weight" and stem.endswith(".lora_mid"):
        return stem[: -len(".lora_mid")], "lora_mid.weight", "LyCORIS"
    if part in _LYCORIS_PARTS and stem:
        return stem, part, "LyCORIS"
    return None


def _lycoris_delta(stem: str, parts: dict[str, torch.Tensor], path) -> tuple[torch.Tensor | None, str]:
    """ΔW (out×in) of a LyCORIS LoHa / LoKr / full-weight layer on a Linear, or (None, why it is not read)."""
    p = {k: v.float() for k, v in parts.items()}
    alpha = p.get("alpha")
    if "diff" in p:
        return (p["diff"], "") if p["diff"].dim() == 2 else (None, "conv layers (LyCORIS full)")
    if "hada_w1_a" in p:
        if "hada_t1" in p or any(p[k].dim() != 2 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return None, "conv layers (LyCORIS LoHa)"
        r = p["hada_w1_b"].shape[0]
        scale = float(alpha) / r if alpha is not None else 1.0
        return (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * scale, ""
    if any(k.startswith("lokr_") for k in p):
        if "lokr_t2" in p:
            return None, "conv layers (LyCORIS LoKr)"
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w1.dim() != 2 or w2.dim() != 2:
            return None, "conv layers (LyCORIS LoKr)"
        low = p.get("lokr_w1_b", p.get("lokr_w2_b"))
        scale = float(alpha) / low.shape[0] if alpha is not None and low is not None else 1.0
        return torch.kron(w1, w2) * scale, ""
    kinds = sorted(k for k in p if k != "alpha")
    return None, f"LyCORIS parts this tool does not read ({', '.join(kinds[:3])})"


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file in any layout diffusers, ComfyUI or A1111 load: UNet and text-encoder layers (the rest is
    counted).

    Reads kohya stems (diffusers or LDM names), PEFT keys with or without ``unet.``/``base_model.model.`` prefixes,
    ``lora.down``/``lora.up``, diffusers' old attention-processor keys (``<attn>.processor.to_q_lora.down.weight``),
    ComfyUI's ``diffusion_model.`` names and LyCORIS files: LoCon (lora_down/up on any layer) is read as factors,
    LoHa/LoKr/full layers on a Linear as ΔW. Text-encoder layers named ``lora_te_``/``lora_te1_``/``lora_te2_``/
    ``text_encoder.``/``text_encoder_2.`` are read too (stems keep the prefix); conv layers, text-encoder layers under
    other prefixes, DoRA magnitudes and unknown keys are counted in ``other`` (reported, not tested). Which stem is which key module is decided by
    :meth:`LoraFile.by_module`.
    """
    path = resolve_lora_path(path)
    tensors, metadata = load_safetensors(path, what="LoRA file")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    dialects: set[str] = set()
    other: dict[str, int] = {}
    text_encoder: set[str] = set()
    for key, t in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES) and not key.startswith(_READ_TE_PREFIXES):
            text_encoder.add(key.split(".")[0] if key.startswith("lora_te") else key.rsplit(".", 2)[0])
            continue
        split = _split_key(key)
        if split is None:
            other["unrecognised tensors"] = other.get("unrecognised tensors", 0) + 1
            continue
        stem, part, dialect = split
        parts.setdefault(stem, {})[part] = t
        if dialect:
            dialects.add(dialect)
    if text_encoder:
        other["text-encoder layers"] = len(text_encoder)
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    conv: dict[str, dict[str, torch.Tensor]] = {}
    bias: dict[str, torch.Tensor] = {}

    def count(what: str) -> None:
        other[what] = other.get(what, 0) + 1

    for stem, p in parts.items():
        if "dora" in p:
            count("DoRA magnitudes (ignored; the low-rank part is tested)")
        if "down" in p or "up" in p:
            if "down" not in p or "up" not in p:
                raise UserError(f"{path}: {stem} has a {'down/A' if 'down' in p else 'up/B'} weight but no "
                                f"{'up/B' if 'down' in p else 'down/A'} weight")
            down, up = p["down"], p["up"]
            if down.dim() == 4 or up.dim() == 4 or "lora_mid.weight" in p:
                count("conv layers (LoCon)")
                conv[stem] = p  # applied by the function-level test (seal_diffusion.formats.suspect_weights)
                continue
            if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                raise UserError(f"{path}: {stem} has incompatible shapes down{tuple(down.shape)} up{tuple(up.shape)}")
            scale = float(p["alpha"]) / down.shape[0] if "alpha" in p else 1.0
            entries[stem] = (down.float(), up.float() * scale)
        elif set(p) - {"alpha", "dora"}:
            delta, why = _lycoris_delta(stem, p, path)
            if delta is None:
                count(why)
                if why.startswith("conv layers"):
                    conv[stem] = p
            else:
                deltas[stem] = delta
                dialects.add("LyCORIS LoHa/LoKr/full")
            if "diff_b" in p:
                bias[stem] = p["diff_b"].float()
        elif "alpha" in p:
            continue  # an alpha with nothing to scale (e.g. a pruned layer)
    if not entries and not deltas:
        found = "; ".join(f"{v} {k}" for k, v in other.items()) or "nothing"
        raise UserError(f"{path}: no UNet or text-encoder LoRA weights this tool can read (found: {found})")
    layout = "kohya" if any(s.startswith(_KOHYA_PREFIXES) for s in [*entries, *deltas]) else "diffusers"
    if "conv layers (LoCon)" in other:
        dialects.add("LyCORIS LoCon")
    return LoraFile(layout, entries, metadata, str(path), deltas=deltas, dialect=", ".join(sorted(dialects)),
                    other=other, conv=conv, bias=bias)
