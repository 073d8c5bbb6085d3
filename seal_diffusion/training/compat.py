"""The options of diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` that a diffusers user types out of
habit, with diffusers' names, defaults and meaning where they apply to this trainer, and a one-line warning where
they cannot change anything here (so a copied command line runs instead of stopping with "unrecognized arguments").

What each does here:

* ``--lora_dropout P``: dropout on the adapter's input, ``B·C·A·dropout(x)`` (as PEFT's ``lora_dropout``), only while
  training; the released LoRA and every check are unchanged by it.
* ``--pre_compute_text_embeddings``: what this trainer always does without ``--train_text_encoder`` (the prompts
  are encoded once); refused together with ``--train_text_encoder``, as in diffusers.
* ``--image_interpolation_mode``: the filter that resizes the images to the training resolution (default lanczos,
  as diffusers; earlier versions of this trainer always used bilinear).
* ``--tokenizer_name``: a tokenizer (folder or hub id) used instead of the base model's to encode the prompts.
* ``--tokenizer_max_length N`` / ``--text_encoder_use_attention_mask``: prompts padded to N tokens (default: the
  tokenizer's 77) / the text encoder given the padding mask (SD 1.x, as in diffusers' SD 1.x script).
* ``--class_labels_conditioning timesteps``: the timesteps passed to the UNet as ``class_labels`` (UNets with a
  class embedding, e.g. DeepFloyd IF); a UNet without one ignores them, which is said once.
* ``--prior_generation_precision``: the precision the class images of prior preservation are generated in
  (default fp16 on a GPU, else fp32, as diffusers); fp16/bf16 run under autocast.
* ``--lr_num_cycles`` / ``--lr_power``: the restarts of ``cosine_with_restarts`` / the power of ``polynomial``.
* ``--local_rank``: set by distributed launchers; accelerate reads the process layout itself (``LOCAL_RANK`` wins, as
  in diffusers), so it changes nothing else.
* ``--validation_images``: checked to be readable images; a text-to-image pipeline takes no input image, so they are
  not used (diffusers passes them to image-variation and super-resolution pipelines only).
* ``--enable_xformers_memory_efficient_attention``: xformers' attention on a CUDA GPU with xformers installed; on a
  CPU (or without xformers) it changes nothing: the attention already runs through PyTorch's
  ``scaled_dot_product_attention``, which is memory-efficient.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import torch

from ..errors import UserError

INTERPOLATION_MODES = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
_PIL_FILTER = {"nearest": "NEAREST", "nearest_exact": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC",
               "box": "BOX", "hamming": "HAMMING", "lanczos": "LANCZOS"}


def add_compat_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusers options (train_dreambooth_lora.py names; see docs/training.md)")
    g.add_argument("--lora_dropout", type=float, default=0.0,
                   help="dropout on the adapter's input while training (as PEFT's lora_dropout; default 0)")
    g.add_argument("--pre_compute_text_embeddings", action="store_true",
                   help="accepted: the prompts are always encoded once here (unless --train_text_encoder)")
    g.add_argument("--image_interpolation_mode", choices=INTERPOLATION_MODES, default="lanczos",
                   help="filter that resizes the images (default lanczos, as diffusers)")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer folder or hub id (default: the base model's)")
    g.add_argument("--tokenizer_max_length", type=int, default=None,
                   help="pad/truncate prompts to this many tokens (SD 1.x; default: the tokenizer's, 77)")
    g.add_argument("--text_encoder_use_attention_mask", action="store_true",
                   help="give the text encoder the prompts' attention mask (SD 1.x)")
    g.add_argument("--class_labels_conditioning", choices=("timesteps",), default=None,
                   help="pass the timesteps as the UNet's class_labels (UNets with a class embedding)")
    g.add_argument("--prior_generation_precision", choices=("no", "fp32", "fp16", "bf16"), default=None,
                   help="precision of the class-image generation (default fp16 on a GPU, else fp32)")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="hard restarts of cosine_with_restarts (default 1)")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial scheduler (default 1.0)")
    g.add_argument("--local_rank", type=int, default=-1, help="set by distributed launchers (LOCAL_RANK wins)")
    g.add_argument("--validation_images", nargs="+", default=None,
                   help="accepted and checked; unused: a text-to-image pipeline takes no input image")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention on a CUDA GPU; on a CPU it changes nothing (PyTorch's SDPA is used)")


def check_compat(args: argparse.Namespace, need) -> None:
    """Validate the diffusers options (``need(cond, message)`` raises a one-line error)."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - namespaces built by the UI lack them
    p = g("lora_dropout", 0.0)
    need(math.isfinite(p) and 0.0 <= p < 1.0, f"--lora_dropout {p}: must be in [0, 1)")
    need(not (g("pre_compute_text_embeddings") and g("train_text_encoder")),
         "--pre_compute_text_embeddings cannot be used with --train_text_encoder (as in diffusers)")
    n = g("tokenizer_max_length")
    need(n is None or n >= 2, f"--tokenizer_max_length {n}: must be ≥ 2")
    need(not ((n is not None or g("text_encoder_use_attention_mask") or g("tokenizer_name"))
              and g("train_text_encoder")),
         "--tokenizer_name/--tokenizer_max_length/--text_encoder_use_attention_mask: only for the prompts encoded once "
         "(not with --train_text_encoder)")
    need(g("lr_num_cycles", 1) >= 1, f"--lr_num_cycles {g('lr_num_cycles')}: must be ≥ 1")
    need(math.isfinite(g("lr_power", 1.0)) and g("lr_power", 1.0) > 0, f"--lr_power {g('lr_power')}: must be > 0")
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1 and hasattr(args, "local_rank"):
        args.local_rank = env_rank  # as diffusers: the launcher's environment wins
    for path in g("validation_images") or []:
        from ..models.images import load_image

        load_image(path, 8)  # unreadable → one line naming the file


def resample_filter(args):
    """The PIL filter of ``--image_interpolation_mode`` (lanczos by default)."""
    from PIL import Image

    return getattr(Image.Resampling, _PIL_FILTER[getattr(args, "image_interpolation_mode", "lanczos")])


def apply_to_pipeline(args, pipe, device, warn) -> None:
    """Options that change the loaded pipeline: the tokenizer, xformers; and the warnings of options that do
    nothing here (said once, before training)."""
    if getattr(args, "tokenizer_name", None):
        from transformers import AutoTokenizer

        try:
            pipe.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=getattr(args, "revision", None))
        except Exception as exc:  # hub errors, missing files: one line
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"--tokenizer_name {args.tokenizer_name}: could not load a tokenizer ({msg})") from exc
    n = getattr(args, "tokenizer_max_length", None)
    if n is not None:
        limit = int(getattr(pipe.text_encoder.config, "max_position_embeddings", n))
        if n > limit:
            raise UserError(f"--tokenizer_max_length {n}: this text encoder takes at most {limit} tokens")
    if getattr(args, "enable_xformers_memory_efficient_attention", False):
        if torch.device(device).type == "cuda" and importlib.util.find_spec("xformers") is not None:
            pipe.unet.enable_xformers_memory_efficient_attention()
        else:
            warn("--enable_xformers_memory_efficient_attention: changes nothing here (no CUDA GPU or no xformers): the "
                 "attention already runs through PyTorch's memory-efficient scaled_dot_product_attention")
    if getattr(args, "class_labels_conditioning", None) and getattr(pipe.unet, "class_embedding", None) is None:
        warn("--class_labels_conditioning timesteps: this UNet has no class embedding, so the class labels change "
             "nothing (as in diffusers, which passes them the same way)")
    if getattr(args, "validation_images", None):
        warn(f"--validation_images: {len(args.validation_images)} image(s) checked but not used: a text-to-image "
             "pipeline takes no input image")


def custom_text_encoding(args) -> bool:
    """Whether the prompts are encoded the diffusers-script way (own length or attention mask) instead of by the
    pipeline's encode_prompt."""
    return getattr(args, "tokenizer_max_length", None) is not None or bool(
        getattr(args, "text_encoder_use_attention_mask", False))


@torch.no_grad()
def encode_prompt_ids(pipe, prompt: str, device, args):
    """SD 1.x conditioning of ``prompt`` as diffusers' DreamBooth script encodes it: tokens padded/truncated to
    ``--tokenizer_max_length`` (default the tokenizer's), the attention mask given to the text encoder with
    ``--text_encoder_use_attention_mask``; the encoder's last hidden state."""
    from ..models.conditioning import Conditioning

    tok = pipe.tokenizer
    max_length = getattr(args, "tokenizer_max_length", None) or tok.model_max_length
    inputs = tok(prompt, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt")
    te = pipe.text_encoder
    mask = inputs.attention_mask.to(te.device) if getattr(args, "text_encoder_use_attention_mask", False) else None
    hidden = te(inputs.input_ids.to(te.device), attention_mask=mask)[0]
    return Conditioning(hidden.to(device))


def scheduler_kwargs(args) -> dict:
    return {"num_cycles": getattr(args, "lr_num_cycles", 1), "power": getattr(args, "lr_power", 1.0)}


def prior_autocast(args, device):
    """The autocast context of class-image generation for ``--prior_generation_precision`` (None: full precision)."""
    choice = getattr(args, "prior_generation_precision", None)
    dev = torch.device(device).type
    if choice is None:
        choice = "fp16" if dev == "cuda" else "fp32"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(choice)
    return (lambda: torch.autocast(dev, dtype=dtype)) if dtype is not None else None


def running_training_summary(*, num_examples: int, batches_per_epoch: int, num_epochs: int, batch_size: int,
                             total_batch_size: int, accumulation: int, max_steps: int, file=None) -> None:
    """The block diffusers' script prints before its first step (on stderr, as its logger does)."""
    file = file or sys.stderr
    print("***** Running training *****", file=file)
    for label, value in (("Num examples", num_examples), ("Num batches each epoch", batches_per_epoch),
                         ("Num Epochs", num_epochs), ("Instantaneous batch size per device", batch_size),
                         ("Total train batch size (w. parallel, distributed & accumulation)", total_batch_size),
                         ("Gradient Accumulation steps", accumulation), ("Total optimization steps", max_steps)):
        print(f"  {label} = {value}", file=file)
