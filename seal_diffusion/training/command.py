"""``train_dreambooth_seal.py`` / ``seal-diffusion train``: parse, train, print where the outputs are.

Bad input is one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys

from ..errors import UserError, os_error_line
from ..quiet import quiet_libraries
from .args import PROG, parse_args, set_prog
from .loop import train


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Command-line entry: train, print the outputs; bad input → one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    set_prog(prog)
    quiet_libraries()
    try:
        args = parse_args(argv)
        result = train(args)
    except UserError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable or impossible output path: one line, like any bad input
        if debug:
            raise
        print(f"{prog}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if result.get("is_main_process"):
        lines = [f"trained {result['steps']} steps on {result['num_processes']} process(es) "
                 f"({result['steps_per_second']:.2f} steps/s), "
                 f"final loss {result['final_loss']:.4f}"]
        if result.get("key_path"):
            lines.append(f"private key (keep secret, back it up): {result['key_path']}")
            lines.append(f"commitment (publish it with the LoRA): {result['commitment']}")
        lines.append(f"public LoRA to share (kohya: upload sites, ComfyUI, AUTOMATIC1111): {result['lora_path']}")
        lines.append(f"public LoRA for diffusers (pipe.load_lora_weights): {result['diffusers_path']}")
        lines.append(f"model card: {result['model_card']}")
        if result.get("hub_url"):
            lines.append(f"uploaded the public files to {result['hub_url']}")
        if args.checkpointing_steps:
            lines.append("checkpoint-*/ folders are private (they hold the passports): do not publish them")
        print("\n".join(lines))
    return 0
