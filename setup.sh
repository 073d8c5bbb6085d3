#!/usr/bin/env bash
# Create .venv and install seal-diffusion with the pinned CPU stack (constraints.txt keeps torch at the local
# 2.13.0 CPU build, so no CUDA wheels are pulled). Safe to re-run: it only installs what is missing.
# GPU users: create your own environment with your CUDA torch, then `pip install -e .` (no constraints file).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
# --no-compile: pip would byte-compile all of torch, transformers, gradio… (~30 s on 2 cores); instead compile just
# what the seal-diffusion commands import, by importing it once with bytecode writing on (~15 s, once).
.venv/bin/python -m pip install -qq --no-compile --disable-pip-version-check -c constraints.txt -e ".[test]"
PYTHONDONTWRITEBYTECODE= TRANSFORMERS_VERBOSITY=error .venv/bin/python -c "
import seal_diffusion.cli, seal_diffusion.demo, accelerate, safetensors.torch, skimage.metrics, torchmetrics.image
from diffusers import StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL, DDPMScheduler, PNDMScheduler
from transformers import CLIPTextModel, CLIPTokenizer
import matplotlib.pyplot"
