"""The fine-tuning attack: continue plain-LoRA training from a public LoRA file (``attack finetune``).

It runs the ordinary trainer (``--method lora --init_lora FILE``); the trainer loads the file's factors with
:func:`seal_diffusion.core.network.init_from_lora`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import UserError
from ..formats.lora_file import read_lora
from ..models.subject import write_subject
from ..training import parse_args, train


def finetune_lora(lora_path, out, *, data=None, base="tiny", steps: int = 100, learning_rate: float = 5e-5,
                  seed: int = 0, overwrite: bool = False, config=None, instance_prompt: str = "a photo of sks cat",
                  progress_callback=None) -> Path:
    """The fine-tuning attack: continue plain-LoRA training from a public file on ``data`` and write the result
    (kohya layout) to ``out``. Without ``data`` the bundled subject is used."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; refusing to overwrite it (pass --force)")
    with tempfile.TemporaryDirectory(prefix="seal-finetune-") as tmp:
        if data is None:
            data = write_subject(Path(tmp) / "subject")
        argv = ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data),
                "--instance_prompt", instance_prompt, "--output_dir", str(Path(tmp) / "run"), "--output_name", "ft",
                "--method", "lora", "--init_lora", str(lora_path), "--max_train_steps", str(steps),
                "--learning_rate", str(learning_rate), "--seed", str(seed), "--train_batch_size", "1",
                "--cache_latents", "--center_crop"]  # cached latents are center-cropped: say so, no warning
        if config:
            argv += ["--config", str(config)]
        result = train(parse_args(argv), progress_callback)
        result["network"].remove()
        tuned = read_lora(result["lora_path"])
        tuned.metadata = dict(read_lora(lora_path).metadata) or tuned.metadata
        return tuned.save(out, overwrite=overwrite)

