"""Images made during training: validation images (``--validation_prompt``) and the class images of prior
preservation (generated into ``--class_data_dir`` when there are too few)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import atomic_write
from ..models.images import IMAGE_SUFFIXES
from .compat import prior_autocast
from .data import generator_for


@torch.no_grad()
def generate_images(pipe, prompt: str, n: int, seed: int, tag: str, steps: int, batch: int, autocast) -> list:
    images = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        gens = [generator_for(seed, tag, start + j) for j in range(k)]
        with autocast():
            images += pipe([prompt] * k, num_inference_steps=steps, generator=gens).images
    return images


def _save_png(image, path: Path) -> Path:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def ensure_class_images(args, pipe, accelerator, seed: int) -> None:
    """Generate the missing class images into --class_data_dir (main process; the others wait), in the precision of
    --prior_generation_precision (fp16/bf16: under autocast; default fp16 on a GPU, else fp32, as diffusers)."""
    class_dir = Path(args.class_data_dir).expanduser()
    if accelerator.is_main_process:
        if class_dir.exists() and not class_dir.is_dir():
            raise UserError(f"--class_data_dir {class_dir}: not a folder")
        class_dir.mkdir(parents=True, exist_ok=True)
        have = [p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        missing = args.num_class_images - len(have)
        if missing > 0:
            print(f"generating {missing} class images for {args.class_prompt!r} into {class_dir}", file=sys.stderr)
            pipe.to(accelerator.device)
            images = generate_images(pipe, args.class_prompt, missing, seed, "class-images",
                                     args.num_class_inference_steps, args.sample_batch_size,
                                     prior_autocast(args, accelerator.device) or accelerator.autocast)
            for i, im in enumerate(images):
                digest = hashlib.sha1(im.tobytes()).hexdigest()[:12]
                _save_png(im, class_dir / f"{len(have) + i:05d}-{digest}.png")
    accelerator.wait_for_everyone()


def run_validation(pipe, network, args, seed: int, tag: str, out_dir: Path, autocast) -> list[str]:
    mode = "C" if network.is_seal else "identity"
    was_training, net_training = pipe.unet.training, network.training
    pipe.unet.eval()
    network.eval()  # no --lora_dropout while generating
    try:
        with network.passport(mode):
            images = generate_images(pipe, args.validation_prompt, args.num_validation_images, seed, "validation",
                                     args.validation_inference_steps, args.num_validation_images, autocast)
    finally:
        pipe.unet.train(was_training)
        network.train(net_training)
    return [str(_save_png(im, out_dir / f"{tag}-{i:02d}.png")) for i, im in enumerate(images)]

