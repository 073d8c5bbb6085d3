"""Commands that compare outputs: ``compare`` (base / C / C_p / no passport / exported) and ``sigma-sweep``
(paper Table 16)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..defaults import COMPARE_GUIDANCE as DEFAULT_GUIDANCE, COMPARE_SEEDS as DEFAULT_SEEDS, \
    COMPARE_STEPS as DEFAULT_STEPS, COMPARE_SUBJECT as DEFAULT_SUBJECT, SWEEP_BATCH, SWEEP_LR, SWEEP_SIGMAS, \
    SWEEP_TRAIN_STEPS
from ..errors import UserError
from .common import Output, add_force, check_first

COMPARE_FILES = ("grid.png", "images", "compare.md", "compare.json")  # what compare() writes into --out

# library imports are inside the handlers: --help and the other commands do not wait for torch


def _seeds(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None


def add_compare_command(sub) -> None:
    p = sub.add_parser("compare", help="images with base / C / C_p / no passport / exported; SSIM, PSNR, grid")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--base", default="tiny", help="base model: tiny, hub id, diffusers folder or .safetensors")
    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file base")
    p.add_argument("--allow_pickle", action="store_true", help="allow a pickle (.ckpt) base checkpoint you trust")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None,
                   help="text file with one prompt per line ('#' comments, '{}' → --subject), or live_subjects/objects")
    p.add_argument("--subject", default=DEFAULT_SUBJECT, help=f"fills '{{}}' in --prompts (default {DEFAULT_SUBJECT!r})")
    p.add_argument("--seeds", nargs="+", type=_seeds, default=list(DEFAULT_SEEDS), help="seeds (default 0 1)")
    p.add_argument("--out", required=True, help="output folder (grid.png, images/, compare.md, compare.json)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"inference steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    p.add_argument("--batch_size", type=int, default=4, help="images per pipeline call")
    p.add_argument("--clip_model", default=None, help="CLIP folder or hub id: adds CLIP-T (and CLIP-I with real images)")
    p.add_argument("--dino_model", default=None, help="DINO ViT folder or hub id: adds DINO (needs --real_images)")
    p.add_argument("--real_images", default=None, help="folder of real subject images for CLIP-I / DINO")
    p.add_argument("--commitment", default=None, metavar="HEX",
                   help="the commitment you published: the key is refused unless it matches")
    add_force(p, "the files of an earlier run in --out")
    p.set_defaults(func=cmd_compare, check=check_compare)


def sweep_output_names(sigmas) -> tuple[str, ...]:
    """What sigma_sweep() writes into --out: the bundled subject, one run per σ, the table, JSON and plot."""
    return ("subject", *(f"sigma_{float(s):g}" for s in sigmas), "sigma_sweep.md", "sigma_sweep.json",
            "sigma_sweep.png")


def check_compare(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.out, "--out", folder=True, writes=COMPARE_FILES), key=args.key, base=args.base,
                real_images=args.real_images, prompts=args.prompts)


def cmd_compare(args) -> int:
    from ..reports.compare import compare, pairs_table, read_prompts
    from ..core.keyfile import SealKey, check_commitment

    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts, args.subject)
    if not prompts:
        raise UserError("compare: give --prompt P (repeatable) or --prompts FILE")
    key = args.key
    if getattr(args, "commitment", None):
        key = SealKey.load(args.key)
        print(f"key matches the published commitment {check_commitment(key, args.commitment)}")
    result = compare(key, args.base, prompts, args.seeds, args.out, steps=args.steps,
                     guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                     batch_size=args.batch_size, config=args.config, allow_pickle=args.allow_pickle,
                     clip_model=args.clip_model, dino_model=args.dino_model, real_images=args.real_images)
    print(pairs_table(result["pairs"]))
    print(f"wrote {result['grid']}, {result['table']}, {Path(args.out) / 'compare.json'} and "
          f"{result['n_images'] * len(result['variants'])} images under {Path(args.out) / 'images'}")
    return 0


def add_sigma_sweep_command(sub) -> None:
    p = sub.add_parser("sigma-sweep", help="train with several passport scales σ; N(B,A,∅) vs base (Table 16)")
    p.add_argument("--out", required=True, help="output folder (sigma_sweep.md/.json/.png and one run per σ)")
    p.add_argument("--base", default="tiny", help="base model (default: tiny, the embedded default)")
    p.add_argument("--sigmas", nargs="+", type=float, default=list(SWEEP_SIGMAS), help="passport stds")
    p.add_argument("--instance_data_dir", default=None, help="subject images (default: the bundled cat)")
    p.add_argument("--instance_prompt", default=None, help="training prompt (default: 'a photo of sks cat')")
    p.add_argument("--prompt", action="append", default=[], help="evaluation prompt (repeatable)")
    p.add_argument("--seeds", nargs="+", type=_seeds, default=[0, 1], help="evaluation seeds")
    p.add_argument("--train_steps", type=int, default=SWEEP_TRAIN_STEPS, help="training steps per σ")
    p.add_argument("--train_batch_size", type=int, default=SWEEP_BATCH, help="training batch size")
    p.add_argument("--learning_rate", type=float, default=SWEEP_LR, help="learning rate (same for every σ)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--steps", type=int, default=10, help="inference steps of the evaluation images")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    add_force(p, "the files of an earlier sweep in --out")
    p.set_defaults(func=cmd_sigma_sweep, check=check_sigma_sweep)


def check_sigma_sweep(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.out, "--out", folder=True, writes=sweep_output_names(args.sigmas)),
                base=args.base, data=args.instance_data_dir)


def cmd_sigma_sweep(args) -> int:
    from ..reports.sigma_sweep import sigma_sweep, sigma_table_md

    result = sigma_sweep(args.out, base=args.base, sigmas=args.sigmas, instance_data_dir=args.instance_data_dir,
                         instance_prompt=args.instance_prompt, prompts=args.prompt or None, seeds=args.seeds,
                         train_steps=args.train_steps, learning_rate=args.learning_rate,
                         train_batch_size=args.train_batch_size, rank=args.rank,
                         steps=args.steps, seed=args.seed)
    print(sigma_table_md(result))
    print(f"wrote {result['table']} and {result['plot']}")
    return 0
