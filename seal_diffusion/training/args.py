"""The trainer's command line: argument parser and checks (names as in diffusers' train_dreambooth_lora.py)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..formats.lora_file import read_lora
from .compat import add_compat_args, check_compat

PROG = "train_dreambooth_seal.py"
_prog = [PROG]  # the name warnings and usage carry: `seal-diffusion train` when run through the CLI
DEFAULT_LR = {"seal": 1e-5, "lora": 5e-5}  # the SEAL paper, Table 12 (SD 1.5 DreamBooth)


def warn(message: str) -> None:
    """The trainer's warnings: one line on stderr."""
    print(f"{_prog[0]}: warning: {message}", file=sys.stderr)


def set_prog(name: str) -> None:
    """Name the program in usage, errors and warnings (``train_dreambooth_seal.py`` or ``seal-diffusion train``)."""
    _prog[0] = name


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=_prog[0],
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
    g.add_argument("--variant", default=None, help="weight variant of the base model's files, e.g. fp16")
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
    g.add_argument("--train_text_encoder", action="store_true",
                   help="also train LoRA adapters, with their own passports, on the CLIP text encoder's attention "
                   "projections (q/k/v/out_proj; SDXL: both encoders). The prompts are then encoded every step "
                   "(slower); the key, the public files (lora_te_… / text_encoder.… layers), verify and scan cover them")
    g.add_argument("--text_encoder_lr", type=float, default=None,
                   help="learning rate of the text-encoder adapters (default: --learning_rate)")
    g.add_argument("--rank", type=int, default=32, help="LoRA rank r (default 32, the SEAL paper's SD 1.5 setting)")
    g.add_argument("--init_lora", default=None,
                   help="start from this public LoRA file/folder (its rank replaces --rank): continued plain-LoRA "
                        "fine-tuning (--method lora, the fine-tuning attack) or a SEAL run on top of it (--method "
                        "seal: passport C starts as the file; the thief of docs/dispute.md)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    g.add_argument("--passport_source", default="random",
                   help="'random' (normal passports, the paper's SEAL†) or 'image:PATH' (a logo/signature as C)")
    g.add_argument("--passport_std", type=float, default=1.0, help="std (scale) of the passports (default 1.0)")
    g.add_argument("--passport_schedule", choices=("alternate", "split"), default="alternate",
                   help="alternate C/C_p every optimizer step, or split every batch between them (default alternate)")
    g.add_argument("--secret", default=None,
                   help="passphrase the passports and A's initialisation are derived from, with scrypt and a random "
                   "salt kept only in the private key (default, recommended: 32 random bytes from the OS, kept "
                   "nowhere). Never written to any file; use 16+ characters")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="lora-dreambooth-model", help="output folder")
    g.add_argument("--output_name", default="lora", help="file stem of NAME.safetensors / NAME.sealkey")
    g.add_argument("--push_to_hub", action="store_true",
                   help="upload the public files (NAME.safetensors, the diffusers file, README.md) to the Hugging Face "
                   "Hub; never the key, checkpoints, logs or validation images")
    g.add_argument("--hub_model_id", default=None, help="Hub repository for --push_to_hub (default: the folder name)")
    g.add_argument("--hub_token", default=None, help="Hub token (default: your saved login)")
    g.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an existing NAME.sealkey and this folder's public files (the only way to do so)")
    g.add_argument("--timestamp_url", default=None, help="RFC 3161 timestamp authority: send NAME.tsq there after "
                   "training and save the reply NAME.tsr (default: only write NAME.tsq and print the command)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps (default 300, as in the paper; overrides --num_train_epochs)")
    g.add_argument("--num_train_epochs", type=int, default=None,
                   help="train this many passes over the images instead (when --max_train_steps is not given)")
    g.add_argument("--train_batch_size", type=int, default=4, help="batch size per device (default 4)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=None,
                   help="default: 1e-5 for seal, 5e-5 for lora — the SEAL paper's SD 1.5 settings (Table 12), under "
                   "which its watermark results were measured (diffusers' script defaults to 5e-4)")
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rate by batch size × accumulation × processes (as diffusers does)")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"))
    g.add_argument("--lr_warmup_steps", type=int, default=0,
                   help="default 0 (diffusers: 500): with the default 300 steps a 500-step warmup would never reach "
                   "the learning rate")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes (must be installed)")
    g.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs (faster)")
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
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="validate after every N epochs instead of every --validation_steps steps")
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--logging_dir", default="logs",
                   help="log folder, relative to --output_dir (default logs): train_log.jsonl and the trackers'")
    g.add_argument("--report_to", default=None,
                   help="tensorboard, wandb, all or none (default: tensorboard when installed, else none)")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_compat_args(p)
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

    epochs = getattr(args, "num_train_epochs", None)
    need(epochs is None or epochs >= 1, f"--num_train_epochs {epochs}: must be ≥ 1")
    if args.max_train_steps is None and epochs is None:
        args.max_train_steps = 300
    need(args.max_train_steps is None or args.max_train_steps >= 1,
         f"--max_train_steps {args.max_train_steps}: must be ≥ 1")
    te_lr = getattr(args, "text_encoder_lr", None)
    need(te_lr is None or (math.isfinite(te_lr) and te_lr > 0), f"--text_encoder_lr {te_lr}: must be a positive number")
    need(te_lr is None or getattr(args, "train_text_encoder", False), "--text_encoder_lr: only with --train_text_encoder")
    need(not getattr(args, "use_8bit_adam", False) or importlib.util.find_spec("bitsandbytes") is not None,
         "--use_8bit_adam: needs bitsandbytes (pip install bitsandbytes), which is not installed")
    need(getattr(args, "validation_epochs", None) is None or args.validation_epochs >= 1,
         f"--validation_epochs {getattr(args, 'validation_epochs', None)}: must be ≥ 1")
    need(bool(str(getattr(args, "logging_dir", "logs")).strip()), "--logging_dir: empty")
    need(args.rank >= 1, f"--rank {args.rank}: must be ≥ 1")
    if getattr(args, "init_lora", None):
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
    check_compat(args, need)
    if args.report_to not in (None, "none", "tensorboard", "wandb", "all"):
        raise UserError(f"--report_to {args.report_to!r}: expected tensorboard, wandb, all or none")
    return args

