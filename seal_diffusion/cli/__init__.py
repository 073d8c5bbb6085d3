"""The ``seal-diffusion`` command: a thin layer over the library (each command calls the same functions as the UI).

Errors in the user's input are one line on stderr and exit code 2 (``--debug`` shows the traceback).

Every subcommand's parser and handler lives in this package, grouped by job: :mod:`.commands_make` (demo,
tiny-model, train, export, ui, timestamp, commitment), :mod:`.commands_check` (verify, scan, challenge, verify-images,
dispute), :mod:`.commands_attack` (attack, robustness) and :mod:`.commands_compare` (compare, sigma-sweep). Start-up
stays light: the parser needs only :mod:`seal_diffusion.defaults` (no torch), and each handler imports the library it
calls when it runs, so ``--help`` loads no torch and ``verify`` of a LoRA file loads torch, safetensors and numpy
only, never diffusers, transformers or scipy (``tests/test_imports.py`` checks it; ``benchmarks/bench_startup.py``
times it).

A command that writes files sets ``check`` beside ``func`` (``p.set_defaults(func=cmd_x, check=check_x)``):
:func:`main` runs it first, so a bad or existing output path (:mod:`seal_diffusion.outpaths`) stops the command in
well under a second, before it imports torch or diffusers, loads a model or renders anything.

The top floor: it may import every sub-package of the library, the demo and the app (:mod:`ui`).
"""

from __future__ import annotations

import argparse
import sys

from ..cpu import short_openmp_spin

short_openmp_spin()  # before the command modules below load torch (the setting has no effect once it is loaded)

from ..errors import UserError, os_error_line  # noqa: E402
from ..quiet import quiet_libraries  # noqa: E402
from .commands_attack import add_attack_command, add_robustness_command  # noqa: E402
from .commands_check import (add_challenge_command, add_dispute_command, add_scan_command,  # noqa: E402
                             add_verify_command, add_verify_images_command)
from .commands_compare import add_compare_command, add_sigma_sweep_command  # noqa: E402
from .commands_make import (add_commitment_command, add_demo_command, add_export_command,  # noqa: E402
                            add_timestamp_command, add_tiny_model_command, add_train_command, add_ui_command)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and exit 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="seal-diffusion",
        description="SEAL watermarks for Stable Diffusion LoRAs (SD 1.5 and SDXL): train with a secret passport, "
        "export an ordinary-looking LoRA, prove ownership of any copy.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in (add_demo_command, add_tiny_model_command, add_train_command, add_export_command, add_verify_command,
                add_scan_command, add_attack_command, add_compare_command, add_sigma_sweep_command,
                add_robustness_command, add_challenge_command, add_verify_images_command, add_ui_command,
                add_timestamp_command, add_dispute_command, add_commitment_command):  # the order of --help
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # everything after `train` belongs to the trainer's own parser (incl. --help)
        quiet_libraries()
        from ..training import main as train_main  # lazy: training imports accelerate and diffusers (~5 s)

        return train_main(argv[1:], prog="seal-diffusion train")
    # --debug is accepted anywhere (before or after the subcommand); it never is a value of another option
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "check", None):  # every output path, before anything slow (even the library imports)
            args.check(args)
        quiet_libraries()
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"seal-diffusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable or impossible output path (read-only folder, a parent that is a file)
        if args.debug:
            raise
        print(f"seal-diffusion {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seal-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
