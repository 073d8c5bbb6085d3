"""What a finished training writes: the private key first (SEAL), then the public files built from it — the kohya
layout ``NAME.safetensors``, the diffusers layout ``pytorch_lora_weights.safetensors`` and the model card. The public
files are ordinary LoRA files: C is folded into the factors, nothing names the method. Also the output folder's
checks before training (writable, nothing replaced by accident) and the training log's file."""

from __future__ import annotations

import json
from pathlib import Path

from ..models.base_model import is_sdxl
from ..errors import UserError
from ..core.export import export_lora
from ..fileio import write_text_atomic
from ..core.fold import fold
from ..core.keyfile import SealKey
from ..formats.lora_file import DIFFUSERS_WEIGHT_NAME, write_lora
from ..formats.lora_names import SD_V1, SDXL
from ..formats.model_card import model_card, public_base_label
from ..outpaths import probe_writable
from ..ownership.timestamp import after_training


def public_paths(output_dir: Path, name: str) -> list[Path]:
    """The public files a run named ``name`` writes into ``output_dir``: kohya file, diffusers file, model card."""
    return [output_dir / f"{name}.safetensors", output_dir / DIFFUSERS_WEIGHT_NAME, output_dir / "README.md"]


def refuse_to_replace(output_dir: Path, name: str, force: bool) -> None:
    """A run must not silently replace another run's public files: the same ``--force`` as the key is needed."""
    found = [p.name for p in public_paths(output_dir, name) if p.exists()]
    if found and not force:
        raise UserError(f"--output_dir {output_dir}: already holds {', '.join(found)} (an earlier run's public files);"
                        " refusing to replace them (pass --force to replace them, or choose another --output_dir)")


def write_outputs(network, args, src, output_dir: Path, steps: int, resolution: int,
                  facts: dict[str, str] | None = None) -> dict:
    """Key first (SEAL), then the public files (``facts``: the kohya file's training metadata). Returns the paths
    and the key commitment."""
    name = args.output_name
    kohya, _, card_path = public_paths(output_dir, name)
    result = {"key_path": None, "commitment": None}
    if network.is_seal:
        key = SealKey.from_network(network, src.label, args.passport_source)
        key_path = output_dir / f"{name}.sealkey"
        key.save(key_path, force=args.force)  # private, atomic, first
        result.update(key_path=str(key_path), commitment=key.commitment())
        export_lora(key, kohya, "kohya", name, metadata=facts)
        diffusers_path = export_lora(key, output_dir, "diffusers", name)
    else:
        scale = network.alpha / network.rank
        public = {m: fold(a, b, None, scale) for m, (a, b) in network.factors().items()}
        arch = SDXL if is_sdxl(network.unet) else SD_V1
        write_lora(public, kohya, "kohya", name, architecture=arch, metadata=facts)
        diffusers_path = write_lora(public, output_dir, "diffusers", name, architecture=arch)
    card = write_text_atomic(card_path, model_card(name, public_base_label(src), args, steps, resolution,
                                                   src.kind, xl=is_sdxl(network.unet)))
    result.update(lora_path=str(kohya), diffusers_path=str(diffusers_path), model_card=str(card))
    result.update(after_training(result["key_path"], getattr(args, "timestamp_url", None)))  # NAME.tsq (and .tsr)
    return result


def check_writable(output_dir: Path) -> None:
    """Fail before training, not after it, when the output folder cannot be made (read-only, a parent is a file,
    ``/proc/…``): a probe file is created and removed (:func:`seal_diffusion.outpaths.probe_writable`)."""
    probe_writable(output_dir, f"--output_dir {output_dir}")


def open_train_log(path: Path, resumed_step: int):
    """Append to the JSONL log; on resume, first drop entries past the checkpoint (the interrupted run's tail)."""
    if path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if resumed_step and json.loads(line)["step"] <= resumed_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        path.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    return open(path, "a", encoding="utf-8")
