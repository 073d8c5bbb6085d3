"""The ``seal-diffusion`` command: a thin layer over the library (each command calls the same functions as the UI).

Errors in the user's input are one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cpu import short_openmp_spin
from .demo import DEMO_STEPS
from .errors import UserError, os_error_line
from .quiet import quiet_libraries


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and exit 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# -- commands ------------------------------------------------------------------------------------------------------
def cmd_tiny_model(args) -> int:
    from .tiny import write_tiny_model

    out = write_tiny_model(args.out, xl=args.xl)
    cls = "StableDiffusionXLPipeline" if args.xl else "StableDiffusionPipeline"
    print(f"wrote the embedded {'SDXL ' if args.xl else ''}default model to {out} (load with {cls}.from_pretrained)")
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

    return train_main(args.train_args + (["--debug"] if args.debug else []), prog="seal-diffusion train")


def cmd_verify(args) -> int:
    from .fileio import write_json_atomic
    from .verify import verify_path

    if args.functional:
        from .functional import verify_both

        report = verify_both(args.key, args.suspect, args.base, threshold=args.threshold, statistic=args.statistic,
                             n_probes=args.probes, prompts=args.prompt, config=args.config,
                             use_cache=not args.no_cache, size=args.probe_size, commitment=args.commitment)
    else:
        report = verify_path(args.key, args.suspect, base=args.base, threshold=args.threshold,
                             statistic=args.statistic, config=args.config, commitment=args.commitment)
    print(report.summary())
    if args.json:
        write_json_atomic(args.json, report.to_json())
    return 0 if report.detected else 1


def cmd_scan(args) -> int:
    from tqdm import tqdm

    from .fileio import write_json_atomic
    from .scan import CORRECTION, exit_code, format_table, scan

    rows, rate = scan(args.key, args.paths, args.threshold, args.statistic,
                      progress=lambda it: tqdm(it, desc="scanning", unit="file", disable=None),
                      combine=args.combine, commitments=args.commitment)
    print(format_table(rows, args.threshold))
    checked = bool(args.commitment)
    print(f"{len(rows)} verdicts, {rate:.1f} files/s; keys " + ("match the published commitments given" if checked
          else "NOT checked against published commitments (pass --commitment HEX)"))
    if args.json:
        write_json_atomic(args.json, {"rows": [vars(r) for r in rows], "files_per_s": rate, "correction": CORRECTION,
                                      "n_tests": len(rows), "threshold": args.threshold,
                                      "commitment_checked": checked})
    return exit_code(rows)


def cmd_attack(args) -> int:
    from . import attacks
    from .lora_file import read_lora

    method = args.method
    if args.steps is None:
        args.steps = 400 if method == "distill" else 100
    if args.lr is None:
        args.lr = 3e-3 if method == "distill" else 5e-5
    if method == "distill":
        from .distill import distill_lora

        res = distill_lora(args.input, args.output, base=args.base or "tiny", rank=args.rank or 4, steps=args.steps,
                           lr=args.lr, seed=args.seed, source=args.source, config=args.config,
                           overwrite=args.overwrite)
        print(f"distill: wrote {res.path} (rank {res.rank}, {res.steps} steps; fidelity kept {res.fidelity:.3f})")
        return 0
    if method == "merge-checkpoint":
        if not args.base:
            raise UserError("attack merge-checkpoint: --base MODEL is required")
        out = attacks.merge_into_checkpoint(args.input, args.base, args.output, weight=args.weight,
                                            config=args.config, overwrite=args.overwrite)
    elif method == "finetune":
        from .finetune import finetune_lora

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
    p.add_argument("--xl", action="store_true", help="write tiny-xl, the SDXL-shaped default, instead of tiny")
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
    p.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                   help="replace an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="ownership test of a LoRA file/folder or a merged model (exit 0 detected, 1 not)",
                       description="Ownership test. Several SUSPECTs are ONE suspect: the files a user loads "
                       "together (each at strength 1), their weight updates added before the test — this undoes a "
                       "LoRA split into parts (A = original + R, B = -R). To test files separately, use scan.")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("suspect", nargs="+",
                   help="LoRA .safetensors in any layout diffusers/ComfyUI/A1111 load, a diffusers LoRA folder, or a "
                        "full model; several: tested as loaded together (deltas added)")
    p.add_argument("--commitment", metavar="HEX",
                   help="the commitment you published with the LoRA: the key is refused unless it matches")
    p.add_argument("--base", help="base model the suspect was merged into (needed for full models)")
    p.add_argument("--config", help="local diffusers folder with the configs, for single-file models offline")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--threshold", type=float, default=3.3, help="detect when -log10 p >= this (default 3.3, p < 5e-4)")
    p.add_argument("--statistic", default="contrast", choices=["contrast", "correlation"],
                   help="pooled statistic (see docs/verification.md)")
    g = p.add_argument_group("function-level test (survives distillation; needs --base)")
    g.add_argument("--functional", action="store_true",
                   help="also run the function-level test; the verdict combines both (Bonferroni: p = 2·min p)")
    g.add_argument("--probes", type=int, default=8, help="secret probes of the function test (default 8)")
    g.add_argument("--probe-size", type=int, help="latent side of the probes (default: the model's, 32 on tiny, "
                   "64 on SD 1.5; smaller is cheaper and a little weaker)")
    g.add_argument("--prompt", action="append",
                   help="prompt for the probes, e.g. the LoRA's instance prompt (repeatable; default: the "
                   "instance prompt of a README.md beside the key, plus generic prompts)")
    g.add_argument("--no-cache", action="store_true",
                   help="do not read or write the private probe cache beside the key")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("scan", help="verify many files against one or many keys; table of verdicts",
                       description="Verify every file against every key. Exit 0: every file was checked and at "
                       "least one detected; 1: none detected; 2: some file could not be checked (unreadable, or none "
                       "of the key's layers found) or bad input. Verdicts are Holm-corrected for files x keys.")
    p.add_argument("--key", required=True, action="append", help="a .sealkey (repeat for several keys)")
    p.add_argument("paths", nargs="+", help="LoRA files or folders (searched for *.safetensors)")
    p.add_argument("--threshold", type=float, default=3.3,
                   help="DETECTED when the Holm-corrected -log10 p >= this (default 3.3, p < 5e-4), corrected for "
                        "files x keys so the whole scan accuses an innocent file with probability < 10^-threshold")
    p.add_argument("--statistic", default="contrast", choices=["contrast", "correlation"],
                   help="contrast (default): exact sign-flip test on <C^, C - C_p>; correlation: the textbook "
                        "Gaussian test on <C^, C>, over-fires on same-subject LoRAs (see docs/verification.md)")
    p.add_argument("--combine", action="store_true",
                   help="also test all the files loaded together (deltas added): catches a LoRA split into parts")
    p.add_argument("--commitment", action="append", metavar="HEX",
                   help="a published commitment (repeat for several keys): every key must match one, or the scan "
                        "is refused")
    p.add_argument("--json", help="write the rows as JSON here")
    p.set_defaults(func=cmd_scan)

    methods = ["prune", "finetune", "rescale", "permute", "mix", "pad-rank", "refactor-svd", "quantize", "noise",
               "merge-lora", "merge-checkpoint", "ambiguity", "distill"]
    p = sub.add_parser("attack", help="apply one attack to a LoRA (or forge a passport: ambiguity)",
                       description="Apply one attack. IN/OUT are LoRA files, except: merge-checkpoint writes a "
                       "model (OUT.safetensors = single file, else a diffusers folder); ambiguity reads a key and "
                       "writes a forged key whose C_p is fake (the claim check must reject it); distill trains a fresh plain "
                       "LoRA to reproduce IN's noise predictions from random inputs (no images) and prints the "
                       "fidelity kept.")
    p.add_argument("method", choices=methods)
    p.add_argument("input", help="input LoRA (a key for ambiguity)")
    p.add_argument("output", help="output path")
    p.add_argument("--ratio", type=float, default=0.9, help="prune: fraction of weights zeroed")
    p.add_argument("--on", default="factors", choices=["factors", "delta"], help="prune: the factors or ΔW")
    p.add_argument("--factor", type=float, default=4.0, help="rescale: up×k, down÷k")
    p.add_argument("--extra", type=int, default=4, help="pad-rank: added rank")
    p.add_argument("--rank", type=int, help="refactor-svd/merge-lora: truncate to this rank; distill: student rank "
                   "(default 4)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "int8"], help="quantize: target precision")
    p.add_argument("--std", type=float, default=0.1, help="noise: std relative to each factor's RMS")
    p.add_argument("--other", help="merge-lora: the other LoRA")
    p.add_argument("--weight", type=float, default=1.0, help="merge-lora: weight of --other; merge-checkpoint: LoRA weight")
    p.add_argument("--base", help="merge-checkpoint/finetune/ambiguity/distill: base model (default tiny for "
                   "finetune and distill)")
    p.add_argument("--config", help="local diffusers config folder for a single-file base")
    p.add_argument("--data", help="finetune/ambiguity: folder of subject images")
    p.add_argument("--steps", type=int, help="finetune/ambiguity(optimised): training steps (default 100); "
                   "distill: default 400")
    p.add_argument("--lr", type=float, help="finetune: learning rate (default 5e-5); distill: Adam lr (default 3e-3)")
    p.add_argument("--source", default="random", choices=["random", "samples"],
                   help="distill: random latents, or noised latents of images the input LoRA generates")
    p.add_argument("--mode", default="gamma", choices=["gamma", "random", "identity", "optimised"],
                   help="ambiguity: how the fake C_p is made")
    p.add_argument("--gamma", type=float, default=0.5, help="ambiguity gamma: share of the forgery mixed into C_p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", "--overwrite", dest="overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_attack)

    from .compare import add_compare_command, add_sigma_sweep_command

    add_compare_command(sub)
    add_sigma_sweep_command(sub)
    from .robustness import add_robustness_command

    add_robustness_command(sub)
    from .image_check import add_image_commands

    add_image_commands(sub)

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
        quiet_libraries()
        from .training import main as train_main

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
    quiet_libraries()
    try:
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


if __name__ == "__main__":
    sys.exit(main())
