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
# modelspec.implementation as kohya's sai_model_spec.build_metadata writes it: SDXL LoRAs name Stability AI's
# reference code, SD 1.x/2.x LoRAs "diffusers"
IMPLEMENTATION = {"sd_v1": "diffusers", "sdxl_base_v1-0": "https://github.com/Stability-AI/generative-models"}
# words of a DreamBooth prompt that are never its identifier ("a photo of sks dog", "a painting in ohwx style")
_FRAME_WORDS = frozenset("a an the of in on at by with and or photo photograph picture image painting drawing "
                         "illustration portrait render style art close-up closeup shot".split())
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


def trigger_word(instance_prompt: str, class_prompt: str | None = None) -> str | None:
    """The DreamBooth identifier of ``instance_prompt`` ("sks" in "a photo of sks cat"): the first word that is not in
    ``class_prompt`` (when given: "a photo of cat") nor a framing word (a, photo, of, style…); DreamBooth prompts put
    the identifier before the class noun. None when nothing is left."""
    def words(text: str) -> list[str]:
        return [w.strip(".,;:!?()[]\"'") for w in text.split()]

    known = {w.lower() for w in words(class_prompt or "")}
    left = [w for w in words(instance_prompt) if w and w.lower() not in _FRAME_WORDS]
    if known:
        new = [w for w in left if w.lower() not in known]
        return new[0] if new else None
    return left[0] if left else None


def training_metadata(*, resolution: int, num_images: int, prompts: dict[str, tuple[str, int]], started_at: float,
                      finished_at: float | None = None, prediction_type: str = "epsilon",
                      sd_model_name: str | None = None, unet_lr: float | None = None) -> dict[str, str]:
    """The training facts of one run: ``prompts`` maps a dataset name (``instance``, ``class``) to (prompt, images).

    ``ss_tag_frequency`` counts the comma-separated tags of each dataset's prompt once per image, as kohya counts
    caption tags, plus the instance prompt's trigger word (:func:`trigger_word`) on its own, so that A1111 and LoRA
    managers, which suggest a LoRA's most frequent tags, offer the word that calls the subject. ``sd_model_name``:
    the base's public name (hub id or file/folder name, never a local path), kohya's ``ss_sd_model_name``;
    ``unet_lr``: the UNet's learning rate (``ss_unet_lr``)."""
    finished_at = time.time() if finished_at is None else finished_at
    tags: dict[str, dict[str, int]] = {}
    for dataset, (prompt, n) in prompts.items():
        counts = tags.setdefault(dataset, {})
        for tag in (t.strip() for t in prompt.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + n
        if dataset == "instance":
            class_prompt = prompts.get("class", (None, 0))[0]
            word = trigger_word(prompt, class_prompt)
            if word and word not in counts:
                counts[word] = n
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
        **({"ss_sd_model_name": sd_model_name} if sd_model_name else {}),
        **({"ss_unet_lr": str(float(unet_lr))} if unet_lr is not None else {}),
    }
