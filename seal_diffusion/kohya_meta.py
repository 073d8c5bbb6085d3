"""The kohya/A1111 metadata of a public kohya-layout LoRA that tools read: the file hashes LoRA managers index by
(``sshs_model_hash``, ``sshs_legacy_hash``) and the training facts they display (resolution, image count, dates, tag
frequency, the ``modelspec.*`` fields of the Stability AI model spec).

The hashes follow kohya sd-scripts (``precalculate_safetensors_hashes``) and sd-webui-additional-networks: the file is
serialised with its ``ss_*`` metadata only; the model hash is SHA-256 of everything after the safetensors header
(the tensor bytes, which is also what A1111 hashes from the file on disk), the legacy hash is the first 8 hex digits
of SHA-256 over the 64 KiB at offset 1 MiB (empty for a small file, as in kohya).

Nothing here names the method or holds a passport, a seed, a secret or a local path: only what any DreamBooth LoRA
trainer records.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone

import torch
from safetensors.torch import save as st_save

SAI_MODEL_SPEC = "1.0.1"
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers name → modelspec name


def file_hashes(data: bytes) -> tuple[str, str]:
    """``(model hash, legacy hash)`` of serialised safetensors bytes, as sd-webui-additional-networks computes them."""
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` plus ``sshs_model_hash``/``sshs_legacy_hash`` of ``tensors`` (any stale ones are replaced)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    model_hash, legacy_hash = file_hashes(st_save(clean, metadata=training_only))
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def training_metadata(*, resolution: int, num_images: int, prompts: dict[str, tuple[str, int]], started_at: float,
                      finished_at: float | None = None, prediction_type: str = "epsilon") -> dict[str, str]:
    """The training facts of one run: ``prompts`` maps a dataset name (``instance``, ``class``) to (prompt, images).

    ``ss_tag_frequency`` counts the comma-separated tags of each dataset's prompt once per image, as kohya counts
    caption tags."""
    finished_at = time.time() if finished_at is None else finished_at
    tags: dict[str, dict[str, int]] = {}
    for dataset, (prompt, n) in prompts.items():
        counts = tags.setdefault(dataset, {})
        for tag in (t.strip() for t in prompt.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + n
    date = datetime.fromtimestamp(int(finished_at), tz=timezone.utc).replace(tzinfo=None).isoformat()
    return {
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_images),
        "ss_training_started_at": repr(float(started_at)),
        "ss_training_finished_at": repr(float(finished_at)),
        "ss_tag_frequency": json.dumps(tags),
        "modelspec.date": date,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": PREDICTION_TYPES.get(prediction_type, prediction_type),
    }
