"""Resumable training checkpoints: ``checkpoint-STEP/`` holds the accelerate state, the passports
(``seal_passports.safetensors``) and the training state, so a resumed run gets exactly the same passports.
**Checkpoints are private**, like the key: never publish them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import load_safetensors, save_safetensors_atomic, write_json_atomic
from .args import warn

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_PASSPORTS = "seal_passports.safetensors"
CHECKPOINT_STATE = "training_state.json"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``checkpoint-STEP`` with a training state) in step order."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / CHECKPOINT_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_checkpoint(spec: str | None, output_dir: Path) -> Path | None:
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            warn(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run")
            return None
        return found[-1][1]
    path = Path(spec)
    if not path.is_dir() and (output_dir / spec).is_dir():
        path = output_dir / spec
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {spec}: no such checkpoint folder")
    if not (path / CHECKPOINT_STATE).is_file():
        raise UserError(f"--resume_from_checkpoint {spec}: not a complete checkpoint (no {CHECKPOINT_STATE})")
    return path


def read_checkpoint_state(path: Path) -> dict:
    try:
        return json.loads((path / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / CHECKPOINT_STATE}: unreadable checkpoint state ({exc})") from exc


def read_checkpoint_passports(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors, _ = load_safetensors(path / CHECKPOINT_PASSPORTS, what="checkpoint passports")
    names = sorted({k.rpartition(".")[0] for k in tensors})
    try:
        return {n: (tensors[f"{n}.passport"], tensors[f"{n}.passport_p"]) for n in names}
    except KeyError as exc:
        raise UserError(f"{path / CHECKPOINT_PASSPORTS}: incomplete ({exc})") from exc


def save_checkpoint(accelerator, network, output_dir: Path, step: int, state: dict, limit: int | None) -> Path:
    """accelerate state + passports + training state into ``checkpoint-STEP`` (written to a temp dir, then renamed)."""
    if limit is not None:
        existing = list_checkpoints(output_dir)
        for _, old in existing[: max(0, len(existing) - limit + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    os.chmod(tmp, 0o700)  # private, like the key: the passports and raw factors are inside
    if network.is_seal:
        tensors = {}
        for name, (c, c_p) in network.passports().items():
            tensors[f"{name}.passport"], tensors[f"{name}.passport_p"] = c, c_p
        save_safetensors_atomic(tensors, tmp / CHECKPOINT_PASSPORTS, {"format": "sealkey-passports"}, private=True)
    write_json_atomic(tmp / CHECKPOINT_STATE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final

