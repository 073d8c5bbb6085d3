"""The public model card (``README.md`` next to the LoRA files): a generic DreamBooth LoRA card.

Nothing in it names the method or reveals a passport, a secret, a seed or a local path.
"""

from __future__ import annotations

import json
from pathlib import Path


def public_base_label(src) -> str:
    """The base model's name for the public model card: hub id, or just the file/folder name (no local paths)."""
    return src.location if src.kind == "hub" else Path(src.location).name if src.kind != "tiny" else "tiny"


def load_base_snippet(base: str, kind: str) -> str:
    """Python lines that load the base model in plain diffusers, for each kind of base (tiny, hub, folder, file)."""
    if kind == "tiny":
        return ('# the tiny test base model as a diffusers folder (its trainer writes it with: tiny-model --out '
                'tiny-model)\npipe = StableDiffusionPipeline.from_pretrained("tiny-model")')
    if kind == "folder":
        return f'pipe = StableDiffusionPipeline.from_pretrained("path/to/{base}")  # your copy of the base model'
    if kind == "single_file":
        return f'pipe = StableDiffusionPipeline.from_single_file("path/to/{base}")  # the base checkpoint'
    return f'pipe = StableDiffusionPipeline.from_pretrained("{base}")'


def model_card(name: str, base: str, args, steps: int, resolution: int, base_kind: str = "hub") -> str:
    """A generic DreamBooth LoRA model card (nothing about passports, secrets, seeds or the method)."""
    prior = f"yes (class prompt: `{args.class_prompt}`)" if args.with_prior_preservation else "no"
    return f"""---
base_model: {base}
library_name: diffusers
instance_prompt: {json.dumps(args.instance_prompt)}
tags:
- text-to-image
- stable-diffusion
- diffusers
- lora
---

# {name}

LoRA weights for `{base}`, trained with DreamBooth on the instance prompt `{args.instance_prompt}`.

## Trigger words

Use `{args.instance_prompt}` in your prompt.

## Files

- `{name}.safetensors` — kohya layout: the file to share and upload (Civitai, the Hugging Face Hub), and the one
  ComfyUI, AUTOMATIC1111 and kohya tools load
- `pytorch_lora_weights.safetensors` — diffusers layout, for `pipe.load_lora_weights(folder)` only (ComfyUI and
  AUTOMATIC1111 ignore its keys)

## Use with diffusers

```python
from diffusers import StableDiffusionPipeline
{load_base_snippet(base, base_kind)}
pipe.load_lora_weights("path/to/this/folder")  # the folder holding this README
image = pipe({json.dumps(args.instance_prompt)}, num_inference_steps=25).images[0]
```

## Training settings

| setting | value |
|---|---|
| rank | {args.rank} |
| steps | {steps} |
| learning rate | {args.learning_rate:g} |
| lr schedule | {args.lr_scheduler} (warmup {args.lr_warmup_steps}) |
| batch size | {args.train_batch_size} × {args.gradient_accumulation_steps} accumulation |
| resolution | {resolution} |
| prior preservation | {prior} |
| mixed precision | {args.mixed_precision or "no"} |
"""

