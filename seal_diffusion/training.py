"""DreamBooth training of a SEAL LoRA (or a plain LoRA through the same code) on Stable Diffusion 1.5.

The flow and the argument names follow diffusers' ``examples/dreambooth/train_dreambooth_lora.py``, so anyone who has
trained a DreamBooth LoRA knows the knobs. What SEAL adds:

* every adapted projection computes ``W x + (α/r)·B·C_t·A·x`` (:class:`~seal_diffusion.network.SealNetwork`) where
  C_t is the secret passport C or the second passport C_p. ``--passport_schedule alternate`` switches C ↔ C_p every
  optimizer step; ``split`` runs the first half of every batch with C and the rest with C_p. The schedule depends
  only on the global step, so all accelerate processes stay in lock-step;
* the passports come from a secret (``--secret``, or 32 random bytes that live nowhere but in the passports) and
  are identical on every process;
* the outputs: the private key ``NAME.sealkey`` first (raw A, B, C, C_p), then the public files built from it
  (``NAME.safetensors`` kohya layout, ``pytorch_lora_weights.safetensors`` diffusers layout, ``README.md``). The
  public files are ordinary LoRA files: C is folded into the factors, nothing names the method.

Checkpoints (``checkpoint-STEP/``) hold the accelerate state *and* the passports (``seal_passports.safetensors``),
so a resumed run gets exactly the same passports. **Checkpoints are private**, like the key: never publish them.

Reproducibility: every random draw of a step (data order, crop/flip, noise, timesteps, VAE sampling) comes from a
generator seeded by (seed, epoch/step, process), never from the global RNG, so resuming from a checkpoint gives the
same final factors as an uninterrupted run.

The library entry points are :func:`train` (also used by the UI) and :func:`main` (the command line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

PROG = "train_dreambooth_seal.py"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_LR = {"seal": 1e-5, "lora": 5e-5}  # the SEAL paper, Table 12 (SD 1.5 DreamBooth)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_PASSPORTS = "seal_passports.safetensors"
CHECKPOINT_STATE = "training_state.json"
TRAIN_LOG = "train_log.jsonl"
MAX_CACHED_IMAGES = 1000  # keep decoded, resized images in memory up to this many

ProgressCallback = Callable[[int, int, float, float], object]


# ==================================================================================================================
# arguments
# ==================================================================================================================
class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="DreamBooth LoRA training for Stable Diffusion 1.5 with a SEAL watermark (a secret passport "
        "between the LoRA factors). Argument names follow diffusers' train_dreambooth_lora.py. Run it with "
        "`accelerate launch train_dreambooth_seal.py ...` for multi-GPU or mixed precision.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", default="tiny",
                   help="base model: 'tiny' (embedded default), a hub id, a local diffusers folder or a single-file "
                   ".safetensors checkpoint (default: tiny)")
    g.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file checkpoint")
    g.add_argument("--allow_pickle", action="store_true", help="allow a pickle (.ckpt) base checkpoint you trust")
    g.add_argument("--revision", default=None, help="hub revision of the base model")
    g.add_argument("--instance_data_dir", required=True, help="folder with the images of your subject")
    g.add_argument("--instance_prompt", required=True, help="prompt with the identifier, e.g. 'a photo of sks dog'")
    g.add_argument("--class_data_dir", default=None, help="folder of class images (generated if too few)")
    g.add_argument("--class_prompt", default=None, help="prompt for class images, e.g. 'a photo of dog'")
    g.add_argument("--with_prior_preservation", action="store_true", help="add the prior-preservation loss")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior loss (default 1.0)")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="minimum number of class images; missing ones are generated (default 100)")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for class-image generation")
    g.add_argument("--num_class_inference_steps", type=int, default=50, help="denoising steps per class image")
    g.add_argument("--resolution", type=int, default=None,
                   help="training resolution (default: the model's native size, 512 for SD 1.5, 64 for tiny)")
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="randomly flip images horizontally")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode the images once (crop fixed to the center; flips kept)")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="data loader worker processes (default 0)")

    g = p.add_argument_group("network")
    g.add_argument("--method", choices=("seal", "lora"), default="seal",
                   help="seal (watermarked, default) or lora (plain LoRA through the same code, for comparison)")
    g.add_argument("--rank", type=int, default=32, help="LoRA rank r (default 32, the SEAL paper's SD 1.5 setting)")
    g.add_argument("--init_lora", default=None,
                   help="--method lora only: start from this public LoRA file/folder (continued fine-tuning; its "
                        "rank replaces --rank) — the fine-tuning attack")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    g.add_argument("--passport_source", default="random",
                   help="'random' (normal passports, the paper's SEAL†) or 'image:PATH' (a logo/signature as C)")
    g.add_argument("--passport_std", type=float, default=1.0, help="std (scale) of the passports (default 1.0)")
    g.add_argument("--passport_schedule", choices=("alternate", "split"), default="alternate",
                   help="alternate C/C_p every optimizer step, or split every batch between them (default alternate)")
    g.add_argument("--secret", default=None,
                   help="passphrase the passports are derived from (default: 32 random bytes, kept nowhere). "
                   "Never written to any file")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="lora-dreambooth-model", help="output folder")
    g.add_argument("--output_name", default="lora", help="file stem of NAME.safetensors / NAME.sealkey")
    g.add_argument("--force", action="store_true", help="replace an existing NAME.sealkey (the only way to do so)")
    g.add_argument("--timestamp_url", default=None, help="RFC 3161 timestamp authority: send NAME.tsq there after "
                   "training and save the reply NAME.tsr (default: only write NAME.tsq and print the command)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_train_steps", type=int, default=300, help="optimizer steps (default 300, as in the paper)")
    g.add_argument("--train_batch_size", type=int, default=4, help="batch size per device (default 4)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=None,
                   help="default: 1e-5 for seal, 5e-5 for lora (the paper's Table 12)")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"))
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: accelerate's config (no when unset). A and B always stay fp32")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for UNet activation memory")
    g.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")

    g = p.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="save a (private) resumable checkpoint every N steps to output_dir/checkpoint-STEP")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--validation_prompt", default=None, help="prompt for validation images")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=100, help="validate every N steps (and at the end)")
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--report_to", default=None,
                   help="tensorboard, wandb, all or none (default: tensorboard when installed, else none)")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments (nonsense → :class:`UserError`); fills method-dependent defaults."""
    args = build_parser().parse_args(argv)
    return check_args(args)


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate an argument namespace (from :func:`parse_args` or built by the UI) and fill defaults; idempotent."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(msg)

    need(args.max_train_steps is not None and args.max_train_steps >= 1,
         f"--max_train_steps {args.max_train_steps}: must be ≥ 1")
    need(args.rank >= 1, f"--rank {args.rank}: must be ≥ 1")
    if getattr(args, "init_lora", None):
        need(args.method == "lora", "--init_lora: only with --method lora (continued plain-LoRA fine-tuning)")
        from .lora_file import read_lora

        args.rank = read_lora(args.init_lora).rank
        args.alpha = float(args.rank)
    if args.method == "seal":
        need(args.rank >= 2, f"--rank {args.rank}: SEAL needs rank ≥ 2 (a 1×1 passport is only a scale)")
    if args.alpha is None:
        args.alpha = float(args.rank)
    need(math.isfinite(args.alpha) and args.alpha > 0, f"--alpha {args.alpha}: must be a positive number")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR[args.method]
    need(math.isfinite(args.learning_rate) and args.learning_rate > 0,
         f"--learning_rate {args.learning_rate}: must be a positive number")
    need(args.train_batch_size >= 1, f"--train_batch_size {args.train_batch_size}: must be ≥ 1")
    need(args.gradient_accumulation_steps >= 1,
         f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: must be ≥ 1")
    need(args.lr_warmup_steps >= 0, f"--lr_warmup_steps {args.lr_warmup_steps}: must be ≥ 0")
    need(args.max_grad_norm > 0, f"--max_grad_norm {args.max_grad_norm}: must be > 0")
    need(args.adam_weight_decay >= 0, f"--adam_weight_decay {args.adam_weight_decay}: must be ≥ 0")
    need(args.resolution is None or (args.resolution >= 8 and args.resolution % 8 == 0),
         f"--resolution {args.resolution}: must be a positive multiple of 8")
    need(args.dataloader_num_workers >= 0, f"--dataloader_num_workers {args.dataloader_num_workers}: must be ≥ 0")
    need(args.checkpointing_steps is None or args.checkpointing_steps >= 1,
         f"--checkpointing_steps {args.checkpointing_steps}: must be ≥ 1")
    need(args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 1,
         f"--checkpoints_total_limit {args.checkpoints_total_limit}: must be ≥ 1")
    need(args.num_validation_images >= 1, f"--num_validation_images {args.num_validation_images}: must be ≥ 1")
    need(args.validation_steps >= 1, f"--validation_steps {args.validation_steps}: must be ≥ 1")
    need(args.validation_inference_steps >= 1, f"--validation_inference_steps {args.validation_inference_steps}: must be ≥ 1")
    need(math.isfinite(args.passport_std) and args.passport_std > 0,
         f"--passport_std {args.passport_std}: must be a positive number")
    need(args.passport_source == "random" or args.passport_source.startswith("image:"),
         f"--passport_source {args.passport_source!r}: expected 'random' or 'image:PATH'")
    if args.passport_source.startswith("image:"):
        img = Path(args.passport_source[len("image:"):])
        need(img.is_file(), f"--passport_source {args.passport_source}: {img} is not a file")
    need(args.secret is None or args.secret != "", "--secret: empty passphrase")
    need(bool(args.instance_prompt and args.instance_prompt.strip()), "--instance_prompt: empty")
    name = args.output_name
    need(bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name,
         f"--output_name {name!r}: must be a plain file stem (no folders)")
    need(bool(str(args.output_dir).strip()), "--output_dir: empty")
    if args.with_prior_preservation:
        need(args.class_data_dir is not None, "--with_prior_preservation needs --class_data_dir")
        need(bool(args.class_prompt and args.class_prompt.strip()), "--with_prior_preservation needs --class_prompt")
        need(args.num_class_images >= 1, f"--num_class_images {args.num_class_images}: must be ≥ 1")
        need(args.prior_loss_weight >= 0, f"--prior_loss_weight {args.prior_loss_weight}: must be ≥ 0")
        need(args.sample_batch_size >= 1, f"--sample_batch_size {args.sample_batch_size}: must be ≥ 1")
        need(args.num_class_inference_steps >= 1,
             f"--num_class_inference_steps {args.num_class_inference_steps}: must be ≥ 1")
    if args.report_to not in (None, "none", "tensorboard", "wandb", "all"):
        raise UserError(f"--report_to {args.report_to!r}: expected tensorboard, wandb, all or none")
    return args


# ==================================================================================================================
# reproducible randomness
# ==================================================================================================================
def _derived_seed(seed: int, *parts) -> int:
    digest = hashlib.sha256(repr(("seal-diffusion-train", int(seed)) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator for one purpose (e.g. ``("noise", epoch, batch, process)``) of one run."""
    return torch.Generator().manual_seed(_derived_seed(seed, *parts))


# ==================================================================================================================
# images and the dataset
# ==================================================================================================================
def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def scan_image_dir(folder: str | os.PathLike, arg: str, warn: Callable[[str], None] = _warn) -> list[Path]:
    """The image files of ``folder`` (sorted). Other files are skipped with a warning; none left → UserError."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise UserError(f"{arg} {path}: folder not found")
    if not path.is_dir():
        raise UserError(f"{arg} {path}: not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
        warn(f"{arg} {path}: skipping {len(others)} non-image file(s): {shown}")
    if not images:
        raise UserError(f"{arg} {path}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return images


def load_image(path: Path, resolution: int, warn: Callable[[str], None] = _warn):
    """Decode ``path`` to RGB and resize it so its shorter side is ``resolution`` (corrupt → UserError)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced size (huge photos)
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: image is too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable image ({msg})") from exc
    w, h = im.size
    if min(w, h) < resolution // 2:
        warn(f"{path}: {w}×{h} is much smaller than the training resolution {resolution}; upscaling it")
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return im


def image_to_tensor(im, resolution: int, center_crop: bool, flip: bool, rng: np.random.Generator | None) -> torch.Tensor:
    """Crop (center, or random with ``rng``) to ``resolution``², optionally mirror, map to [−1, 1], CHW float."""
    from PIL import Image

    w, h = im.size
    if center_crop or rng is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageSet:
    """Images of one folder, decoded and resized once (kept in memory for DreamBooth-sized sets)."""

    def __init__(self, files: list[Path], resolution: int, warn: Callable[[str], None] = _warn):
        self.files = files
        self.resolution = resolution
        self._cache: dict[int, object] = {}
        keep = len(files) <= MAX_CACHED_IMAGES
        for i, f in enumerate(files):  # decode everything now: a corrupt file fails before any training
            im = load_image(f, resolution, warn)
            if keep:
                self._cache[i] = im

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int):
        return self._cache[i] if i in self._cache else load_image(self.files[i], self.resolution)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch): the order of every epoch is reproducible, also on resume.

    Yields ``(epoch, index)`` so the dataset can seed each sample's augmentation. The epoch is set with
    :meth:`use_epoch` (not ``set_epoch``, which accelerate's loaders call with their own counter).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=_generator(self.seed, "order", self.epoch)).tolist()
        return iter([(self.epoch, i) for i in order])


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance (and class) samples; pixels in [−1, 1], or cached VAE moments when ``latent_cache`` is set.

    Like diffusers' DreamBoothDataset the length is max(#instance, #class) and sample i pairs instance i mod n with
    class i mod m. Augmentation (random crop, flip) is seeded by (seed, epoch, i).
    """

    def __init__(self, instance: ImageSet, class_set: ImageSet | None, resolution: int, center_crop: bool,
                 random_flip: bool, seed: int):
        self.instance, self.class_set = instance, class_set
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.latent_cache: dict[str, list[list[torch.Tensor]]] | None = None  # kind → [image][flip] → moments

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_set) if self.class_set is not None else 0)

    def _sample(self, kind: str, images: ImageSet, i: int, rng: np.random.Generator) -> torch.Tensor:
        flip = bool(self.random_flip and rng.random() < 0.5)
        if self.latent_cache is not None:
            return self.latent_cache[kind][i][int(flip)]
        return image_to_tensor(images.image(i), self.resolution, self.center_crop, flip, rng)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        rng = np.random.Generator(np.random.PCG64(_derived_seed(self.seed, "augment", epoch, i)))
        item = {"instance": self._sample("instance", self.instance, i % len(self.instance), rng)}
        if self.class_set is not None:
            item["class"] = self._sample("class", self.class_set, i % len(self.class_set), rng)
        return item

    @torch.no_grad()
    def cache_latents(self, vae, device, dtype) -> None:
        """Encode every image once (center crop; unflipped and flipped) and keep the VAE moments on the CPU."""
        cache = {}
        for kind, images in (("instance", self.instance), ("class", self.class_set)):
            if images is None:
                continue
            rows = []
            for i in range(len(images)):
                flips = (False, True) if self.random_flip else (False,)
                px = torch.stack([image_to_tensor(images.image(i), self.resolution, True, f, None) for f in flips])
                moments = vae.encode(px.to(device, dtype)).latent_dist.parameters.float().cpu()
                rows.append(list(moments) if self.random_flip else [moments[0], moments[0]])
            cache[kind] = rows
        self.latent_cache = cache


def collate(items: list[dict]) -> dict:
    out = {"instance": torch.stack([x["instance"] for x in items])}
    if "class" in items[0]:
        out["class"] = torch.stack([x["class"] for x in items])
    return out


# ==================================================================================================================
# model pieces
# ==================================================================================================================
@torch.no_grad()
def encode_prompt(pipe, prompt: str, device) -> torch.Tensor:
    """CLIP hidden states (1 × 77 × d) of ``prompt`` (the text encoder is frozen, so once per run is enough)."""
    tok = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(device))[0]


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * vae_scale_factor(pipe.vae)


def _sample_latents(moments: torch.Tensor, generator: torch.Generator, scaling: float) -> torch.Tensor:
    """Sample the VAE posterior from its moments (mean ‖ logvar) with ``generator``; times the VAE scaling factor."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * eps) * scaling


def training_noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _target(noise_scheduler, latents, noise, timesteps):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"base model: unsupported prediction_type {kind!r} (expected epsilon or v_prediction)")


# ==================================================================================================================
# held-out denoising loss (also used by the claim check and compare)
# ==================================================================================================================
@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means of ``pixels`` (N×3×H×W in [−1, 1]) times the VAE scaling factor: deterministic latents."""
    p = next(vae.parameters())
    mean = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean
    return mean.float() * vae.config.scaling_factor


@torch.no_grad()
def heldout_batch(pipe, image_dir: str | os.PathLike, prompt: str, resolution: int | None = None):
    """``(latents, encoder_hidden_states)`` of the (center-cropped) images in ``image_dir`` with ``prompt``."""
    resolution = resolution or default_resolution(pipe)
    files = scan_image_dir(image_dir, "images", warn=lambda m: None)
    pixels = torch.stack([image_to_tensor(load_image(f, resolution, lambda m: None), resolution, True, False, None)
                          for f in files])
    device = next(pipe.unet.parameters()).device
    return encode_images(pipe.vae, pixels), encode_prompt(pipe, prompt, device)


@torch.no_grad()
def heldout_denoising_loss(
    unet,
    network,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    mode: str = "C",
    seed: int = 0,
    n_timesteps: int = 8,
    noise_scheduler=None,
) -> float:
    """Mean denoising MSE on ``latents`` with FIXED noise and timesteps, with the network's passport set to ``mode``.

    ``mode`` ∈ {C, C_p, identity, off} (``network=None`` means the bare UNet, i.e. ``off``). The timesteps are
    ``n_timesteps`` evenly spaced over the schedule (5 %…95 %) and the noise is drawn from ``seed``, so two calls
    with different modes see exactly the same inputs: the differences are the passport's doing.
    """
    from diffusers import DDPMScheduler

    if noise_scheduler is None:
        from .tiny import SD15_SCHEDULER

        noise_scheduler = DDPMScheduler(**{k: SD15_SCHEDULER[k] for k in
                                           ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    if network is None and mode != "off":
        raise ValueError(f"mode {mode!r} needs a network")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    total_steps = noise_scheduler.config.num_train_timesteps
    steps = torch.linspace(0.05 * (total_steps - 1), 0.95 * (total_steps - 1), n_timesteps).round().long()
    gen = torch.Generator().manual_seed(seed)
    latents = latents.float()
    n = latents.shape[0]
    ehs = encoder_hidden_states
    if ehs.shape[0] == 1 and n > 1:
        ehs = ehs.expand(n, *ehs.shape[1:])
    ehs = ehs.to(device, dtype)
    was_training = unet.training
    unet.eval()
    losses = []
    try:
        import contextlib

        ctx = network.passport(mode) if network is not None else contextlib.nullcontext()
        with ctx:
            for t in steps:
                noise = torch.randn(latents.shape, generator=gen)
                timesteps = torch.full((n,), int(t), dtype=torch.long)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = _target(noise_scheduler, latents, noise, timesteps)
                pred = unet(noisy.to(device, dtype), timesteps.to(device), ehs, return_dict=False)[0]
                losses.append(F.mse_loss(pred.float().cpu(), target.float()).item())
    finally:
        unet.train(was_training)
    return float(np.mean(losses))


# ==================================================================================================================
# checkpoints
# ==================================================================================================================
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
            _warn(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run")
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
    from .fileio import load_safetensors

    tensors, _ = load_safetensors(path / CHECKPOINT_PASSPORTS, what="checkpoint passports")
    names = sorted({k.rpartition(".")[0] for k in tensors})
    try:
        return {n: (tensors[f"{n}.passport"], tensors[f"{n}.passport_p"]) for n in names}
    except KeyError as exc:
        raise UserError(f"{path / CHECKPOINT_PASSPORTS}: incomplete ({exc})") from exc


def save_checkpoint(accelerator, network, output_dir: Path, step: int, state: dict, limit: int | None) -> Path:
    """accelerate state + passports + training state into ``checkpoint-STEP`` (written to a temp dir, then renamed)."""
    from .fileio import save_safetensors_atomic, write_json_atomic

    if limit is not None:
        existing = list_checkpoints(output_dir)
        for _, old in existing[: max(0, len(existing) - limit + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    if network.is_seal:
        tensors = {}
        for name, (c, c_p) in network.passports().items():
            tensors[f"{name}.passport"], tensors[f"{name}.passport_p"] = c, c_p
        save_safetensors_atomic(tensors, tmp / CHECKPOINT_PASSPORTS, {"format": "sealkey-passports"})
    write_json_atomic(tmp / CHECKPOINT_STATE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ==================================================================================================================
# outputs
# ==================================================================================================================
def public_base_label(src) -> str:
    """The base model's name for the public model card: hub id, or just the file/folder name (no local paths)."""
    return src.location if src.kind == "hub" else Path(src.location).name if src.kind != "tiny" else "tiny"


def model_card(name: str, base: str, args, steps: int, resolution: int) -> str:
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

- `{name}.safetensors` — kohya layout (ComfyUI, AUTOMATIC1111, kohya tools)
- `pytorch_lora_weights.safetensors` — diffusers layout

## Use with diffusers

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("path/to/this/folder")
image = pipe({json.dumps(args.instance_prompt)}).images[0]
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


def init_from_lora(network, path) -> None:
    """Load a public LoRA's factors (scale folded into up) into a plain-LoRA network: A = down, B = up / (α/r)."""
    from .lora_file import read_lora

    lora = read_lora(path)
    found = lora.by_module(network.module_names)
    missing = [m for m in network.module_names if m not in found]
    if len(missing) == len(network.module_names):
        raise UserError(f"{path}: none of its layers match this base model's attention layers")
    scale = network.alpha / network.rank
    factors = {m: found.get(m, (network[m].lora_A.detach().cpu(), network[m].lora_B.detach().cpu() * scale))
               for m in network.module_names}
    network.load_factors({m: (d, u / scale) for m, (d, u) in factors.items()})


def finetune_lora(lora_path, out, *, data=None, base="tiny", steps: int = 100, learning_rate: float = 5e-5,
                  seed: int = 0, overwrite: bool = False, config=None, instance_prompt: str = "a photo of sks cat",
                  progress_callback=None) -> Path:
    """The fine-tuning attack: continue plain-LoRA training from a public file on ``data`` and write the result
    (kohya layout) to ``out``. Without ``data`` the bundled subject is used."""
    import tempfile

    from .lora_file import read_lora

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; refusing to overwrite it (pass --overwrite)")
    with tempfile.TemporaryDirectory(prefix="seal-finetune-") as tmp:
        if data is None:
            from .subject import write_subject

            data = write_subject(Path(tmp) / "subject")
        argv = ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data),
                "--instance_prompt", instance_prompt, "--output_dir", str(Path(tmp) / "run"), "--output_name", "ft",
                "--method", "lora", "--init_lora", str(lora_path), "--max_train_steps", str(steps),
                "--learning_rate", str(learning_rate), "--seed", str(seed), "--train_batch_size", "1",
                "--cache_latents"]
        if config:
            argv += ["--config", str(config)]
        result = train(parse_args(argv), progress_callback)
        result["network"].remove()
        tuned = read_lora(result["lora_path"])
        tuned.metadata = dict(read_lora(lora_path).metadata) or tuned.metadata
        return tuned.save(out, overwrite=overwrite)


def write_outputs(network, args, src, output_dir: Path, steps: int, resolution: int) -> dict:
    """Key first (SEAL), then the public files. Returns the paths and the key commitment."""
    from .export import export_lora
    from .fileio import write_text_atomic
    from .fold import fold
    from .keyfile import SealKey
    from .lora_file import write_lora

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
        write_lora(public, kohya, "kohya", name)
        diffusers_path = write_lora(public, output_dir, "diffusers", name)
    card = write_text_atomic(output_dir / "README.md", model_card(name, public_base_label(src), args, steps, resolution))
    result.update(lora_path=str(kohya), diffusers_path=str(diffusers_path), model_card=str(card))
    from .timestamp import after_training  # NAME.tsq beside the key; the reply too with --timestamp_url

    result.update(after_training(result["key_path"], getattr(args, "timestamp_url", None)))
    return result


# ==================================================================================================================
# validation and class images
# ==================================================================================================================
@torch.no_grad()
def generate_images(pipe, prompt: str, n: int, seed: int, tag: str, steps: int, batch: int, autocast) -> list:
    images = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        gens = [_generator(seed, tag, start + j) for j in range(k)]
        with autocast():
            images += pipe([prompt] * k, num_inference_steps=steps, generator=gens).images
    return images


def _save_png(image, path: Path) -> Path:
    from .fileio import atomic_write

    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def ensure_class_images(args, pipe, accelerator, seed: int) -> None:
    """Generate the missing class images into --class_data_dir (main process; the others wait)."""
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
                                     args.num_class_inference_steps, args.sample_batch_size, accelerator.autocast)
            for i, im in enumerate(images):
                digest = hashlib.sha1(im.tobytes()).hexdigest()[:12]
                _save_png(im, class_dir / f"{len(have) + i:05d}-{digest}.png")
    accelerator.wait_for_everyone()


def run_validation(pipe, network, args, seed: int, tag: str, out_dir: Path, autocast) -> list[str]:
    mode = "C" if network.is_seal else "identity"
    was_training = pipe.unet.training
    pipe.unet.eval()
    try:
        with network.passport(mode):
            images = generate_images(pipe, args.validation_prompt, args.num_validation_images, seed, "validation",
                                     args.validation_inference_steps, args.num_validation_images, autocast)
    finally:
        pipe.unet.train(was_training)
    return [str(_save_png(im, out_dir / f"{tag}-{i:02d}.png")) for i, im in enumerate(images)]


# ==================================================================================================================
# training
# ==================================================================================================================
def _report_to(requested: str | None) -> str | None:
    import importlib.util

    def have(mod: str) -> bool:
        return importlib.util.find_spec(mod) is not None

    if requested is None:
        return "tensorboard" if have("tensorboard") or have("tensorboardX") else None
    if requested == "none":
        return None
    if requested == "tensorboard" and not (have("tensorboard") or have("tensorboardX")):
        _warn("--report_to tensorboard: tensorboard is not installed; logging to logs/train_log.jsonl only")
        return None
    if requested == "wandb" and not have("wandb"):
        _warn("--report_to wandb: wandb is not installed; logging to logs/train_log.jsonl only")
        return None
    return requested


def _split_count(n: int, step: int) -> int:
    """Samples of a batch of ``n`` that use C under the split schedule (an odd one alternates with the step)."""
    return n // 2 + (n % 2 if step % 2 == 0 else 0)


def _arrange(inst: torch.Tensor, cls: torch.Tensor | None, k_inst: int, k_cls: int):
    """Batch order for the split schedule: [inst C, class C, inst C_p, class C_p]; returns (x, is_prior)."""
    if cls is None:
        return inst, torch.zeros(len(inst), dtype=torch.bool)
    x = torch.cat([inst[:k_inst], cls[:k_cls], inst[k_inst:], cls[k_cls:]])
    flags = [False] * k_inst + [True] * k_cls + [False] * (len(inst) - k_inst) + [True] * (len(cls) - k_cls)
    return x, torch.tensor(flags)


@dataclass
class _LossSetup:
    """What one training micro-batch needs: sets the passport for the step, returns the DreamBooth loss."""

    network: object
    vae: object
    noise_scheduler: object
    instance_emb: torch.Tensor
    class_emb: torch.Tensor | None
    prior_loss_weight: float
    schedule: str | None  # alternate | split; None for a plain LoRA
    cached_latents: bool
    device: torch.device
    weight_dtype: torch.dtype

    def loss(self, model, batch: dict, gen: torch.Generator, global_step: int) -> torch.Tensor:
        inst, cls = batch["instance"], batch.get("class")
        k_i = k_c = 0
        if self.schedule == "split":  # first k samples (instance and class alike) with C, the rest with C_p
            k_i = _split_count(len(inst), global_step)
            k_c = _split_count(len(cls), global_step) if cls is not None else 0
            self.network.set_passport("split", k_i + k_c)
        elif self.schedule == "alternate":  # C on even steps, C_p on odd steps: same on every process
            self.network.set_passport("C" if global_step % 2 == 0 else "C_p")
        x, is_prior = _arrange(inst, cls, k_i, k_c)
        if self.cached_latents:
            moments = x
        else:
            with torch.no_grad():
                moments = self.vae.encode(x.to(self.device, self.weight_dtype)).latent_dist.parameters
        latents = _sample_latents(moments, gen, float(self.vae.config.scaling_factor)).to(self.device)
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        is_prior = is_prior.to(self.device)
        if self.class_emb is None:
            ehs = self.instance_emb.expand(len(latents), -1, -1)
        else:
            ehs = torch.where(is_prior[:, None, None], self.class_emb, self.instance_emb)
        pred = model(noisy.to(self.weight_dtype), timesteps, ehs, return_dict=False)[0]
        target = _target(self.noise_scheduler, latents, noise, timesteps)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = per_sample[~is_prior].mean()
        if is_prior.any():
            loss = loss + self.prior_loss_weight * per_sample[is_prior].mean()
        return loss


def train(args: argparse.Namespace, progress_callback: ProgressCallback | None = None) -> dict:
    """Run one DreamBooth training (see the module docstring); returns paths, commitment, losses and timings.

    ``progress_callback(step, max_steps, loss, seconds_left)`` is called on the main process after every step.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

    from . import passport as passports_mod
    from .base_model import load_pipeline, resolve_base
    from .network import DEFAULT_TARGETS, SealNetwork, find_target_modules

    args = check_args(args)
    t_start = time.time()
    seal = args.method == "seal"
    output_dir = Path(args.output_dir).expanduser()
    key_path = output_dir / f"{args.output_name}.sealkey"
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    if seal and key_path.exists() and not args.force:
        raise UserError(f"{key_path}: key file already exists; refusing to train over it (pass --force to replace "
                        "it, or choose another --output_name/--output_dir)")
    if not seal and (args.secret is not None or args.passport_source != "random"):
        _warn("--method lora: passport arguments are ignored")

    # -- everything that can fail on input is checked before anything is written ----------------------------------
    instance_files = scan_image_dir(args.instance_data_dir, "--instance_data_dir")
    src = resolve_base(args.pretrained_model_name_or_path, allow_pickle=args.allow_pickle)
    resume = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    ckpt_state = read_checkpoint_state(resume) if resume is not None else None
    if ckpt_state is not None:
        for field in ("method", "rank", "alpha"):
            if ckpt_state.get(field) != getattr(args, field):
                raise UserError(f"--resume_from_checkpoint {resume}: checkpoint has {field}={ckpt_state.get(field)!r},"
                                f" this run has {getattr(args, field)!r}")

    report_to = _report_to(args.report_to)
    # torchrun/accelerate with several processes on a machine without CUDA: accelerate's MULTI_CPU (gloo) needs cpu=True
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    try:
        accelerator = Accelerator(
            cpu=multi_cpu,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        )
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"accelerate: {str(exc).splitlines()[0]} (check --mixed_precision / accelerate config)") from exc
    main_proc = accelerator.is_main_process
    warn = _warn if main_proc else (lambda m: None)

    # seed and secret: chosen on the main process when not given, identical everywhere
    seed = args.seed if args.seed is not None else (ckpt_state or {}).get("seed")
    secret = args.secret
    shared = [seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
              secret if secret is not None else passports_mod.new_secret()]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared, from_process=0)
    seed, secret = shared
    set_seed(seed)

    pipe = load_pipeline(src, config=args.config, allow_pickle=args.allow_pickle, revision=args.revision)
    unet, vae = pipe.unet, pipe.vae
    resolution = args.resolution or default_resolution(pipe)
    if resolution % vae_scale_factor(vae):
        raise UserError(f"--resolution {resolution}: must be a multiple of {vae_scale_factor(vae)} for this VAE")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    instance_set = ImageSet(instance_files, resolution, warn)
    class_set = None
    if args.with_prior_preservation:
        ensure_class_images(args, pipe, accelerator, seed)
        class_set = ImageSet(scan_image_dir(args.class_data_dir, "--class_data_dir", warn), resolution, warn)

    # -- passports ------------------------------------------------------------------------------------------------
    module_names = list(find_target_modules(unet, DEFAULT_TARGETS))
    passports = None
    if seal:
        if resume is not None:
            passports = read_checkpoint_passports(resume)
            if args.secret is not None:
                fresh = passports_mod.make_passports(module_names, args.rank, secret, args.passport_source,
                                                     args.passport_std)
                if any(not torch.equal(fresh[m][0], passports[m][0]) for m in module_names):
                    raise UserError(f"--secret does not match the passports of checkpoint {resume}")
        else:
            passports = passports_mod.make_passports(module_names, args.rank, secret, args.passport_source,
                                                     args.passport_std)
    del secret, shared
    if passports is not None:  # an image passport gives every module the same tensor: own copies (safetensors)
        passports = {m: (c.clone(), c_p.clone()) for m, (c, c_p) in passports.items()}

    # -- frozen model, network -----------------------------------------------------------------------------------
    for m in (unet, vae, pipe.text_encoder):
        m.requires_grad_(False)
    for m in (unet, vae, pipe.text_encoder):
        m.to(device) if weight_dtype == torch.float32 else m.to(device, dtype=weight_dtype)
    instance_emb = encode_prompt(pipe, args.instance_prompt, device)
    class_emb = encode_prompt(pipe, args.class_prompt, device) if args.with_prior_preservation else None
    if not args.validation_prompt:
        pipe.text_encoder.to("cpu")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(_derived_seed(seed, "init") % (2**32))
    network = SealNetwork(unet, args.rank, args.alpha, passports)  # A, B in fp32 on the UNet's device
    if getattr(args, "init_lora", None):
        init_from_lora(network, args.init_lora)  # a resumed run's checkpoint overrides these factors later
    unet.train()

    dataset = DreamBoothDataset(instance_set, class_set, resolution, args.center_crop, args.random_flip, seed)
    if args.cache_latents:
        if not args.center_crop:
            warn("--cache_latents: images are center-cropped once (random crops need uncached latents)")
        dataset.cache_latents(vae, device, weight_dtype)
    sampler = EpochSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=args.dataloader_num_workers)

    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(network, optimizer, loader, lr_scheduler)
    noise_scheduler = training_noise_scheduler(pipe)

    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    global_step, first_epoch, skip_batches = 0, 0, 0
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = int(ckpt_state["global_step"])
        first_epoch = global_step // steps_per_epoch
        steps_into_epoch = global_step - first_epoch * steps_per_epoch
        skip_batches = min(steps_into_epoch * args.gradient_accumulation_steps, batches_per_epoch)
        if main_proc:
            print(f"resuming from {resume} at step {global_step}", file=sys.stderr)

    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "logs").mkdir(exist_ok=True)
        if report_to:
            accelerator.init_trackers("dreambooth-lora", config={
                k: getattr(args, k) for k in ("rank", "learning_rate", "max_train_steps", "train_batch_size",
                                              "gradient_accumulation_steps", "lr_scheduler")})
    log_file = _open_train_log(output_dir / "logs" / TRAIN_LOG, global_step) if main_proc else None

    from tqdm.auto import tqdm

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="Steps", disable=not main_proc,
                    dynamic_ncols=True)
    losses: list[float] = []
    validation_images: list[str] = []
    first_step = global_step
    t_loop = time.time()
    step_loss = 0.0

    def state() -> dict:
        return {"global_step": global_step, "seed": seed, "method": args.method, "rank": args.rank,
                "alpha": args.alpha, "passport_schedule": args.passport_schedule, "targets": list(network.targets)}

    step_setup = _LossSetup(network, vae, noise_scheduler, instance_emb, class_emb, args.prior_loss_weight,
                            args.passport_schedule if seal else None, dataset.latent_cache is not None, device,
                            weight_dtype)
    try:
        for epoch in range(first_epoch, num_epochs):
            sampler.use_epoch(epoch)
            epoch_loader = loader
            start_batch = 0
            if epoch == first_epoch and skip_batches:
                epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
                start_batch = skip_batches
            for batch_idx, batch in enumerate(epoch_loader, start=start_batch):
                with accelerator.accumulate(model):
                    gen = _generator(seed, "step", epoch, batch_idx, accelerator.process_index)
                    loss = step_setup.loss(model, batch, gen, global_step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(network.trainable_parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().item() / args.gradient_accumulation_steps

                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                lr = lr_scheduler.get_last_lr()[0]
                losses.append(step_loss)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if main_proc:
                    log_file.write(json.dumps({"step": global_step, "loss": step_loss, "lr": lr}) + "\n")
                    log_file.flush()
                    if report_to:
                        accelerator.log({"loss": step_loss, "lr": lr}, step=global_step)
                    if progress_callback is not None:
                        done = global_step - first_step
                        left = (time.time() - t_loop) / done * (args.max_train_steps - global_step)
                        progress_callback(global_step, args.max_train_steps, step_loss, left)
                    if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                        path = save_checkpoint(accelerator, network, output_dir, global_step, state(),
                                               args.checkpoints_total_limit)
                        progress.write(f"saved checkpoint {path} (private: holds the passports)")
                    if (args.validation_prompt and global_step % args.validation_steps == 0
                            and global_step < args.max_train_steps):
                        validation_images += run_validation(pipe, network, args, seed, f"step-{global_step:06d}",
                                                            output_dir / "validation", accelerator.autocast)
                step_loss = 0.0
                if global_step >= args.max_train_steps:
                    break
            if global_step >= args.max_train_steps:
                break
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()

    train_seconds = time.time() - t_loop
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        _check_lock_step(network, accelerator)
    result: dict = {}
    if seal and args.passport_source == "random":
        network.assign_release_passports()  # the secret coin, after training: what makes verification exact
    if main_proc:
        network.set_passport("C" if seal else "identity")
        result = write_outputs(network, args, src, output_dir, global_step, resolution)
        if args.validation_prompt:
            validation_images += run_validation(pipe, network, args, seed, "final", output_dir / "validation",
                                                accelerator.autocast)
    if report_to:
        accelerator.end_training()
    steps_run = global_step - first_step
    result.update(
        method=args.method,
        output_dir=str(output_dir),
        steps=global_step,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        validation_images=validation_images,
        train_log=str(output_dir / "logs" / TRAIN_LOG),
        train_seconds=train_seconds,
        steps_per_second=steps_run / train_seconds if train_seconds > 0 else float("nan"),
        total_seconds=time.time() - t_start,
        resolution=resolution,
        num_processes=accelerator.num_processes,
        is_main_process=main_proc,
    )
    result["network"] = network
    result["pipeline"] = pipe
    if accelerator.num_processes == 1:
        _reset_accelerate_state()
    return result


def _open_train_log(path: Path, resumed_step: int):
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


def _network_digest(network) -> str:
    h = hashlib.sha256()
    tensors = list(network.factors().items()) + (list(network.passports().items()) if network.is_seal else [])
    for name, pair in tensors:
        h.update(name.encode())
        for t in pair:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_lock_step(network, accelerator) -> None:
    """All processes must end with the same passports and factors (DDP keeps A, B in sync; C, C_p come from the
    broadcast secret). A mismatch would mean a wrong key, so it is an error, not a warning."""
    from accelerate.utils import gather_object

    digests = gather_object([_network_digest(network)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes disagree on the trained network ({len(set(digests))} distinct states)")


def _reset_accelerate_state() -> None:
    """Let the next :func:`train` in this process (tests, the UI) use other accelerate settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ==================================================================================================================
# command line
# ==================================================================================================================
def _quiet_libraries() -> None:
    """The CLI's settings (library log levels, no model-loading bars), so both entry points behave the same."""
    from .cli import _quiet_libraries as quiet

    quiet()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: train, print the outputs; bad input → one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _quiet_libraries()
    try:
        args = parse_args(argv)
        result = train(args)
    except UserError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if result.get("is_main_process"):
        lines = [f"trained {result['steps']} steps on {result['num_processes']} process(es) "
                 f"({result['steps_per_second']:.2f} steps/s), "
                 f"final loss {result['final_loss']:.4f}"]
        if result.get("key_path"):
            lines.append(f"private key (keep secret, back it up): {result['key_path']}")
            lines.append(f"commitment (publish it with the LoRA): {result['commitment']}")
        lines.append(f"public LoRA (kohya): {result['lora_path']}")
        lines.append(f"public LoRA (diffusers): {result['diffusers_path']}")
        lines.append(f"model card: {result['model_card']}")
        if args.checkpointing_steps:
            lines.append("checkpoint-*/ folders are private (they hold the passports): do not publish them")
        print("\n".join(lines))
    return 0
