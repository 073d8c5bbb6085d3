"""What a finished training writes: the private key first (SEAL), then the public files built from it — the kohya
layout ``NAME.safetensors``, the diffusers layout ``pytorch_lora_weights.safetensors`` and the model card. The public
files are ordinary LoRA files: C is folded into the factors, nothing names the method."""

from __future__ import annotations

from pathlib import Path

from ..export import export_lora
from ..fileio import write_text_atomic
from ..fold import fold
from ..keyfile import SealKey
from ..base_model import is_sdxl
from ..lora_file import write_lora
from ..lora_names import SD_V1, SDXL
from ..model_card import model_card, public_base_label


def write_outputs(network, args, src, output_dir: Path, steps: int, resolution: int) -> dict:
    """Key first (SEAL), then the public files. Returns the paths and the key commitment."""
    name = args.output_name
    kohya = output_dir / f"{name}.safetensors"
    result = {"key_path": None, "commitment": None}
    if network.is_seal:
        key = SealKey.from_network(network, src.label, args.passport_source)
        key_path = output_dir / f"{name}.sealkey"
        key.save(key_path, force=args.force)  # private, atomic, first
        result.update(key_path=str(key_path), commitment=key.commitment())
        export_lora(key, kohya, "kohya", name)
        diffusers_path = export_lora(key, output_dir, "diffusers", name)
    else:
        scale = network.alpha / network.rank
        public = {m: fold(a, b, None, scale) for m, (a, b) in network.factors().items()}
        arch = SDXL if is_sdxl(network.unet) else SD_V1
        write_lora(public, kohya, "kohya", name, architecture=arch)
        diffusers_path = write_lora(public, output_dir, "diffusers", name, architecture=arch)
    card = write_text_atomic(output_dir / "README.md", model_card(name, public_base_label(src), args, steps, resolution))
    result.update(lora_path=str(kohya), diffusers_path=str(diffusers_path), model_card=str(card))
    return result

