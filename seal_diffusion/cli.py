"""The ``seal-diffusion`` command: a thin layer over the library (each command calls the same functions as the UI).

Errors in the user's input are one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cpu import short_openmp_spin
from .demo import DEMO_STEPS
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and exit 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _quiet_libraries() -> None:
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:  # model-loading bars ("Loading pipeline components", "Loading weights") are noise in a CLI
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


# -- commands ------------------------------------------------------------------------------------------------------
def cmd_tiny_model(args) -> int:
    from .tiny import write_tiny_model

    out = write_tiny_model(args.out)
    print(f"wrote the embedded default model to {out} (load with StableDiffusionPipeline.from_pretrained)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.out, steps=args.steps)
    print(f"wrote {args.out}/summary.md ({result['seconds']:.0f} s)")
    return 0


def cmd_ui(args) -> int:
    try:
        from ui.app import launch
    except ImportError as exc:
        raise UserError(f"ui: the app is not installed ({exc}); re-run ./setup.sh") from exc
    launch(host=args.host, port=args.port, base=args.base, max_file_size=args.max_file_size)
    return 0


def cmd_export(args) -> int:
    from .export import export_lora
    from .keyfile import SealKey

    key = SealKey.load(args.key)
    name = args.name or Path(args.out).stem
    path = export_lora(key, args.out, args.format, name, overwrite=args.overwrite)
    print(f"wrote {args.format} LoRA to {path} ({len(key.modules)} modules, rank {key.rank})")
    return 0


def cmd_commitment(args) -> int:
    from .keyfile import SealKey

    print(SealKey.load(args.key).commitment())
    return 0


def cmd_train(args) -> int:
    from .training import main as train_main

    return train_main(args.train_args)


def cmd_verify(args) -> int:
    from .fileio import write_json_atomic
    from .verify import verify_path

    report = verify_path(args.key, args.suspect, base=args.base, threshold=args.threshold,
                         statistic=args.statistic, config=args.config)
    print(report.summary())
    if args.json:
        write_json_atomic(args.json, report.to_json())
    return 0 if report.detected else 1


def cmd_scan(args) -> int:
    from tqdm import tqdm

    from .fileio import write_json_atomic
    from .scan import format_table, scan

    rows, rate = scan(args.key, args.paths, args.threshold, args.statistic,
                      progress=lambda it: tqdm(it, desc="scanning", unit="file", disable=None))
    print(format_table(rows))
    print(f"{len(rows)} verdicts, {rate:.1f} files/s")
    if args.json:
        write_json_atomic(args.json, {"rows": [vars(r) for r in rows], "files_per_s": rate})
    return 0 if any(r.detected for r in rows) else 1


def cmd_attack(args) -> int:
    from . import attacks
    from .lora_file import read_lora

    method = args.method
    if method == "merge-checkpoint":
        if not args.base:
            raise UserError("attack merge-checkpoint: --base MODEL is required")
        out = attacks.merge_into_checkpoint(args.input, args.base, args.output, weight=args.weight,
                                            config=args.config, overwrite=args.overwrite)
    elif method == "finetune":
        from .training import finetune_lora

        out = finetune_lora(args.input, args.output, data=args.data, base=args.base or "tiny", steps=args.steps,
                            learning_rate=args.lr, seed=args.seed, overwrite=args.overwrite, config=args.config)
    elif method == "ambiguity":
        from .claim import forge_key

        out = forge_key(args.input, args.output, mode=args.mode, gamma=args.gamma, seed=args.seed,
                        data=args.data, base=args.base, steps=args.steps, overwrite=args.overwrite)
    else:
        lora = read_lora(args.input)
        kwargs = {
            "prune": dict(ratio=args.ratio, on=args.on),
            "rescale": dict(factor=args.factor),
            "permute": dict(seed=args.seed),
            "mix": dict(seed=args.seed),
            "pad-rank": dict(extra=args.extra, seed=args.seed),
            "refactor-svd": dict(rank=args.rank),
            "quantize": dict(dtype=args.dtype),
            "noise": dict(std=args.std, seed=args.seed),
        }.get(method)
        if method == "merge-lora":
            if not args.other:
                raise UserError("attack merge-lora: --other LORA is required")
            result = attacks.merge_lora(lora, read_lora(args.other), weight=args.weight, rank=args.rank)
        else:
            result = attacks.FILE_ATTACKS[method](lora, **kwargs)
        out = result.save(args.output, overwrite=args.overwrite)
    print(f"{method}: wrote {out}")
    return 0


def cmd_timestamp(args) -> int:
    from .timestamp import stamp_command, stamp_key

    done = stamp_key(args.key, args.tsa, args.ca, args.reply, args.timeout)
    if done["request"]:
        print(f"wrote the timestamp request {done['request']} (commitment {done['commitment']})")
    stamp = done["stamp"]
    if stamp:
        print(f"timestamp OK: commitment {stamp.commitment} existed at {stamp.gen_time} (UTC), signed by {stamp.tsa}")
    if done["reply"] and not stamp:
        print(f"wrote the reply {done['reply']}, not checked against a CA: pass --ca (the TSA's CA certificate)")
    if not args.tsa and not args.reply:
        print(f"send it to a timestamp authority (before you publish): {stamp_command(args.key)}")
    return 0


# -- parser ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="seal-diffusion",
        description="SEAL watermarks for Stable Diffusion 1.5 LoRAs: train with a secret passport, export an "
        "ordinary-looking LoRA, prove ownership of any copy.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo", help="the main job on the embedded default: train, export, verify, attack, compare")
    p.add_argument("--out", default="demo-out", help="output folder (summary.md, images, key, LoRAs)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"training steps of each LoRA (default {DEMO_STEPS}; more makes the passports' effect clearer)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tiny-model", help="write the embedded default model as a diffusers folder")
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("train", help="train a SEAL LoRA (same as accelerate launch train_dreambooth_seal.py ARGS)",
                       add_help=False)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments of train_dreambooth_seal.py (see train --help)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="rebuild the public LoRA from the private key")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--format", required=True, choices=["kohya", "diffusers"], help="key layout of the LoRA file")
    p.add_argument("--out", required=True, help="output .safetensors (or a folder, for the diffusers layout)")
    p.add_argument("--name", help="ss_output_name / title in the kohya metadata (default: file stem)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="ownership test of a LoRA file/folder or a merged model (exit 0 detected, 1 not)")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("suspect", help="LoRA .safetensors (kohya or diffusers), a diffusers LoRA folder, or a full model")
    p.add_argument("--base", help="base model the suspect was merged into (needed for full models)")
    p.add_argument("--config", help="local diffusers folder with the configs, for single-file models offline")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--threshold", type=float, default=3.3, help="detect when -log10 p >= this (default 3.3, p < 5e-4)")
    p.add_argument("--statistic", default="contrast", choices=["contrast", "correlation"],
                   help="pooled statistic (see docs/verification.md)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("scan", help="verify many files against one or many keys; table of verdicts")
    p.add_argument("--key", required=True, action="append", help="a .sealkey (repeat for several keys)")
    p.add_argument("paths", nargs="+", help="LoRA files or folders (searched for *.safetensors)")
    p.add_argument("--threshold", type=float, default=3.3)
    p.add_argument("--statistic", default="contrast", choices=["contrast", "correlation"])
    p.add_argument("--json", help="write the rows as JSON here")
    p.set_defaults(func=cmd_scan)

    methods = ["prune", "finetune", "rescale", "permute", "mix", "pad-rank", "refactor-svd", "quantize", "noise",
               "merge-lora", "merge-checkpoint", "ambiguity"]
    p = sub.add_parser("attack", help="apply one attack to a LoRA (or forge a passport: ambiguity)",
                       description="Apply one attack. IN/OUT are LoRA files, except: merge-checkpoint writes a "
                       "model (OUT.safetensors = single file, else a diffusers folder); ambiguity reads a key and "
                       "writes a forged key whose C_p is fake (the claim check must reject it).")
    p.add_argument("method", choices=methods)
    p.add_argument("input", help="input LoRA (a key for ambiguity)")
    p.add_argument("output", help="output path")
    p.add_argument("--ratio", type=float, default=0.9, help="prune: fraction of weights zeroed")
    p.add_argument("--on", default="factors", choices=["factors", "delta"], help="prune: the factors or ΔW")
    p.add_argument("--factor", type=float, default=4.0, help="rescale: up×k, down÷k")
    p.add_argument("--extra", type=int, default=4, help="pad-rank: added rank")
    p.add_argument("--rank", type=int, help="refactor-svd/merge-lora: truncate to this rank")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "int8"], help="quantize: target precision")
    p.add_argument("--std", type=float, default=0.1, help="noise: std relative to each factor's RMS")
    p.add_argument("--other", help="merge-lora: the other LoRA")
    p.add_argument("--weight", type=float, default=1.0, help="merge-lora: weight of --other; merge-checkpoint: LoRA weight")
    p.add_argument("--base", help="merge-checkpoint/finetune/ambiguity: base model (default tiny for finetune)")
    p.add_argument("--config", help="local diffusers config folder for a single-file base")
    p.add_argument("--data", help="finetune/ambiguity: folder of subject images")
    p.add_argument("--steps", type=int, default=100, help="finetune/ambiguity(optimised): training steps")
    p.add_argument("--lr", type=float, default=5e-5, help="finetune: learning rate")
    p.add_argument("--mode", default="gamma", choices=["gamma", "random", "identity", "optimised"],
                   help="ambiguity: how the fake C_p is made")
    p.add_argument("--gamma", type=float, default=0.5, help="ambiguity gamma: share of the forgery mixed into C_p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_attack)

    from .compare import add_compare_command, add_sigma_sweep_command

    add_compare_command(sub)
    add_sigma_sweep_command(sub)
    from .robustness import add_robustness_command

    add_robustness_command(sub)

    p = sub.add_parser("ui", help="the web app for creators: train, export, compare, verify (http://127.0.0.1:7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 opens it to your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--base", default="tiny", help="base model preselected in the app (default: tiny)")
    p.add_argument("--max-file-size", default="1gb", help="largest upload accepted (default 1gb)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("timestamp", help="RFC 3161 timestamp of the key's commitment: write NAME.tsq, fetch and "
                       "check NAME.tsr", description="Writes the request NAME.tsq beside the key. With --tsa, sends it "
                       "to that timestamp authority and writes the checked reply NAME.tsr; with --reply, checks an "
                       "existing reply. Stamp before you publish (docs/dispute.md).")
    p.add_argument("--key", required=True, help="the private .sealkey file (only read)")
    p.add_argument("--tsa", help="URL of an RFC 3161 timestamp authority (HTTP POST); none: only write the request")
    p.add_argument("--ca", help="the TSA's CA certificate(s), PEM: the reply must chain to it")
    p.add_argument("--reply", help="check this existing .tsr instead of fetching one (needs --ca)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the TSA (default 30)")
    p.set_defaults(func=cmd_timestamp)

    from .dispute import add_dispute_command

    add_dispute_command(sub)

    p = sub.add_parser("commitment", help="print the SHA-256 commitment of a key (publish it with the LoRA)")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.set_defaults(func=cmd_commitment)
    return parser


def main(argv: list[str] | None = None) -> int:
    short_openmp_spin()  # before torch's import
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # everything after `train` belongs to the trainer's own parser (incl. --help)
        _quiet_libraries()
        from .training import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"seal-diffusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seal-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
