"""The public model card (``README.md`` next to the LoRA files): a generic DreamBooth LoRA card.

Nothing in it names the method or reveals a passport, a secret, a seed or a local path.
"""

from __future__ import annotations

import json
from pathlib import Path


def public_base_label(src) -> str:
    """The base model's name for the public model card: hub id, or just the file/folder name (no local paths)."""
    return src.location if src.kind in ("hub", "tiny") else Path(src.location).name


def pipeline_name(xl: bool) -> str:
    return "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"


def load_base_snippet(base: str, kind: str, xl: bool = False) -> str:
    """Python lines that load the base model in plain diffusers, for each kind of base (tiny, hub, folder, file)."""
    cls = pipeline_name(xl)
    if kind == "tiny":
        flag, folder = (" --xl", "tiny-xl-model") if xl else ("", "tiny-model")
        return (f'# the tiny test base model as a diffusers folder (its trainer writes it with: tiny-model{flag} --out '
                f'{folder})\npipe = {cls}.from_pretrained("{folder}")')
    if kind == "folder":
        return f'pipe = {cls}.from_pretrained("path/to/{base}")  # your copy of the base model'
    if kind == "single_file":
        return f'pipe = {cls}.from_single_file("path/to/{base}")  # the base checkpoint'
    return f'pipe = {cls}.from_pretrained("{base}")'


def model_card(name: str, base: str, args, steps: int, resolution: int, base_kind: str = "hub",
               xl: bool = False) -> str:
    """A generic DreamBooth LoRA model card (nothing about passports, secrets, seeds or the method); ``xl``: the base
    is an SDXL model."""
    prior = f"yes (class prompt: `{args.class_prompt}`)" if args.with_prior_preservation else "no"
    return f"""---
base_model: {base}
library_name: diffusers
instance_prompt: {json.dumps(args.instance_prompt)}
tags:
- text-to-image
- {"stable-diffusion-xl" if xl else "stable-diffusion"}
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
from diffusers import {pipeline_name(xl)}
{load_base_snippet(base, base_kind, xl)}
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
| text encoder | {_text_encoder_row(args)} |
"""


def _text_encoder_row(args) -> str:
    """Whether the text encoder(s) got LoRA layers too (``--train_text_encoder``), and at which learning rate."""
    if not getattr(args, "train_text_encoder", False):
        return "not trained"
    return f"trained too (learning rate {getattr(args, 'text_encoder_lr', None) or args.learning_rate:g})"
