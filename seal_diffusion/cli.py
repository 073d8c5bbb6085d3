"""The ``seal-diffusion`` command: a thin layer over the library (each command calls the same functions as the UI).

Errors in the user's input are one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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


# -- commands ------------------------------------------------------------------------------------------------------
def cmd_tiny_model(args) -> int:
    from .tiny import write_tiny_model

    out = write_tiny_model(args.out)
    print(f"wrote the embedded default model to {out} (load with StableDiffusionPipeline.from_pretrained)")
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


# -- parser ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="seal-diffusion",
        description="SEAL watermarks for Stable Diffusion 1.5 LoRAs: train with a secret passport, export an "
        "ordinary-looking LoRA, prove ownership of any copy.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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

    p = sub.add_parser("commitment", help="print the SHA-256 commitment of a key (publish it with the LoRA)")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.set_defaults(func=cmd_commitment)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
