"""Public LoRA files in the two layouts frontends read, and reading any LoRA file back.

* ``diffusers``: ``unet.<module>.lora_A.weight`` (r×in) / ``unet.<module>.lora_B.weight`` (out×r), the PEFT keys that
  ``pipe.load_lora_weights`` reads; no alpha, so the scale is folded into lora_B (diffusers assumes alpha = r).
* ``kohya``: ``lora_unet_<module with '.'→'_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (= rank) plus
  the ``ss_*``/``modelspec.*`` metadata that ComfyUI, A1111 and LoRA managers read.

What gets written is exactly what a LoRA trainer of that rank writes: no passport, raw factor, secret, seed, or any word
naming the method. :func:`read_lora` also reads the older diffusers dialect (``.lora.down.weight``) and returns the
effective (down, up·alpha/r) factors of every module, for verification and attacks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .fileio import load_safetensors, save_safetensors_atomic
from .kohya_meta import SAI_MODEL_SPEC, with_hashes

LAYOUTS = ("diffusers", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def kohya_stem(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


@dataclass
class LoraFile:
    """A LoRA as read from disk: ``entries[name] = (down r×in, up out×r)`` with any alpha/r scale folded into up.

    ``name`` is the diffusers module path for the diffusers layout and the ``lora_unet_…`` stem for kohya;
    :meth:`by_module` maps either to module paths.
    """

    layout: str
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def rank(self) -> int:
        return max(d.shape[0] for d, _ in self.entries.values())

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the entries back in this file's own layout and key names (used by attacks)."""
        path = Path(path)
        if self.layout == "diffusers" and (path.is_dir() or path.suffix == ""):
            path = path / DIFFUSERS_WEIGHT_NAME
        tensors: dict[str, torch.Tensor] = {}
        for stem, (down, up) in self.entries.items():
            if self.layout == "diffusers":
                tensors[f"unet.{stem}.lora_A.weight"] = down
                tensors[f"unet.{stem}.lora_B.weight"] = up
            else:
                tensors[f"{stem}.lora_down.weight"] = down
                tensors[f"{stem}.lora_up.weight"] = up
                tensors[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
        metadata = dict(self.metadata)
        if self.layout == "kohya":
            metadata["ss_network_dim"] = str(self.rank)
            metadata["ss_network_alpha"] = str(float(self.rank))
            metadata = with_hashes(tensors, metadata)  # the tensors changed: so do the hashes
        return save_safetensors_atomic(tensors, path, metadata, overwrite=overwrite, what="LoRA file")

    def by_module(self, module_names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module path: (down, up)}`` for the given module paths that the file holds."""
        if self.layout == "diffusers":
            return {m: self.entries[m] for m in module_names if m in self.entries}
        return {m: self.entries[kohya_stem(m)] for m in module_names if kohya_stem(m) in self.entries}


def lora_tensors(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str, name: str = "lora"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a public file from ``{module: (A′, B′)}`` (scale already in B′)."""
    if layout not in LAYOUTS:
        raise UserError(f"--format {layout!r}: expected one of {', '.join(LAYOUTS)}")
    tensors: dict[str, torch.Tensor] = {}
    ranks = {a.shape[0] for a, _ in factors.values()}
    rank = max(ranks)
    if layout == "diffusers":
        for module, (a, b) in factors.items():
            tensors[f"unet.{module}.lora_A.weight"] = a
            tensors[f"unet.{module}.lora_B.weight"] = b
        return tensors, {"format": "pt"}
    for module, (a, b) in factors.items():
        stem = kohya_stem(module)
        tensors[f"{stem}.lora_down.weight"] = a
        tensors[f"{stem}.lora_up.weight"] = b
        tensors[f"{stem}.alpha"] = torch.tensor(float(a.shape[0]))  # alpha = rank → scale 1, B′ carries α/r
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": name,
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
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
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a public LoRA atomically. ``path`` may be a folder for the diffusers layout. ``metadata``: training
    facts for the kohya layout (:func:`seal_diffusion.kohya_meta.training_metadata`); hashes are added here."""
    path = Path(path)
    if layout == "diffusers" and (path.is_dir() or path.suffix == ""):
        path = path / DIFFUSERS_WEIGHT_NAME
    tensors, base_metadata = lora_tensors(factors, layout, name)
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


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file (diffusers/PEFT, old diffusers or kohya keys); UNet entries only."""
    path = resolve_lora_path(path)
    tensors, metadata = load_safetensors(path, what="LoRA file")
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layout = None
    downs, ups, alphas = {}, {}, {}
    for key, t in tensors.items():
        if key.startswith("lora_unet_"):
            layout = layout or "kohya"
            stem, _, rest = key.partition(".")
            if rest == "lora_down.weight":
                downs[stem] = t
            elif rest == "lora_up.weight":
                ups[stem] = t
            elif rest == "alpha":
                alphas[stem] = float(t)
        elif key.startswith("unet."):
            layout = layout or "diffusers"
            body = key[len("unet."):]
            for down_sfx, up_sfx in ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")):
                if body.endswith(down_sfx):
                    downs[body[: -len(down_sfx)]] = t
                elif body.endswith(up_sfx):
                    ups[body[: -len(up_sfx)]] = t
    if not downs:
        raise UserError(f"{path}: no UNet LoRA weights found (expected lora_unet_* or unet.*.lora_A/B keys)")
    for stem, down in downs.items():
        if stem not in ups:
            raise UserError(f"{path}: {stem} has a down/A weight but no up/B weight")
        up = ups[stem]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise UserError(f"{path}: {stem} has incompatible shapes down{tuple(down.shape)} up{tuple(up.shape)}")
        scale = alphas[stem] / down.shape[0] if stem in alphas else 1.0
        entries[stem] = (down.float(), up.float() * scale)
    return LoraFile(layout, entries, metadata, str(path))
