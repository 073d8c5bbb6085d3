"""Commands that make and publish a LoRA: ``demo``, ``tiny-model``, ``train``, ``export``, ``ui``, ``timestamp``,
``commitment``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..defaults import DEMO_STEPS
from ..errors import UserError
from .common import Output, add_force, check_first

# library imports are inside the handlers: --help and the other commands do not wait for torch


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default: train, export, verify, attack, compare")
    p.add_argument("--out", default="demo-out", help="output folder (summary.md, images, key, LoRAs)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"training steps of each LoRA (default {DEMO_STEPS}; more makes the passports' effect clearer)")
    add_force(p, "the files of an earlier run in a non-empty --out folder")
    p.set_defaults(func=cmd_demo, check=check_demo)


def check_demo(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.out, "--out", folder=True))


def cmd_demo(args) -> int:
    from ..demo import run_demo

    result = run_demo(args.out, steps=args.steps)
    print(f"wrote {args.out}/summary.md ({result['seconds']:.0f} s)")
    return 0


def add_tiny_model_command(sub) -> None:
    p = sub.add_parser("tiny-model", help="write the embedded default model as a diffusers folder")
    p.add_argument("--out", required=True, help="folder to write (an existing one is replaced only with --force, and "
                   "only if it is a diffusers model folder)")
    p.add_argument("--xl", action="store_true", help="write tiny-xl, the SDXL-shaped default, instead of tiny")
    add_force(p, "an existing model folder")
    p.set_defaults(func=cmd_tiny_model, check=check_tiny_model)


def check_tiny_model(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.out, "--out", folder=True, whole=True, marker="model_index.json"))


def cmd_tiny_model(args) -> int:
    from ..models.tiny import write_tiny_model

    out = write_tiny_model(args.out, xl=args.xl)
    cls = "StableDiffusionXLPipeline" if args.xl else "StableDiffusionPipeline"
    print(f"wrote the embedded {'SDXL ' if args.xl else ''}default model to {out} (load with {cls}.from_pretrained)")
    return 0


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train a SEAL LoRA (same as accelerate launch train_dreambooth_seal.py ARGS)",
                       add_help=False)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments of train_dreambooth_seal.py (see train --help)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..training import main as train_main  # training imports accelerate and diffusers (~5 s)

    return train_main(args.train_args + (["--debug"] if args.debug else []), prog="seal-diffusion train")


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="rebuild the public LoRA from the private key")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--format", required=True, choices=["kohya", "diffusers"], help="key layout of the LoRA file")
    p.add_argument("--out", required=True, help="output .safetensors (or a folder, for the diffusers layout)")
    p.add_argument("--name", help="ss_output_name / title in the kohya metadata (default: file stem)")
    p.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                   help="replace an existing output file")
    p.set_defaults(func=cmd_export, check=check_export)


def check_export(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    from ..formats.lora_file import DIFFUSERS_WEIGHT_NAME  # torch: export needs it anyway

    out = Path(args.out)
    if args.format == "diffusers" and (out.is_dir() or out.suffix == ""):  # a folder: the file inside it
        out = out / DIFFUSERS_WEIGHT_NAME
    check_first(args, Output(str(out), "--out"), key=args.key)


def cmd_export(args) -> int:
    from ..core.export import export_lora
    from ..core.keyfile import SealKey

    key = SealKey.load(args.key)
    name = args.name or Path(args.out).stem
    path = export_lora(key, args.out, args.format, name, overwrite=args.overwrite)
    print(f"wrote {args.format} LoRA to {path} ({len(key.modules)} modules, rank {key.rank})")
    return 0


def add_ui_command(sub) -> None:
    p = sub.add_parser("ui", help="the web app for creators (SD 1.5 and SDXL): train and timestamp, export, compare, "
                       "verify, check images, dispute (http://127.0.0.1:7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 opens it to your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--base", default="tiny", help="base model preselected in the app (default: tiny)")
    p.add_argument("--max-file-size", default="1gb", help="largest upload accepted (default 1gb)")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    try:
        from ui.app import launch  # lazy: gradio takes ~6 s to import; only `ui` needs it
    except ImportError as exc:
        raise UserError(f"ui: the app is not installed ({exc}); re-run ./setup.sh") from exc
    launch(host=args.host, port=args.port, base=args.base, max_file_size=args.max_file_size)
    return 0


def add_timestamp_command(sub) -> None:
    p = sub.add_parser("timestamp", help="RFC 3161 timestamp of the key's commitment: write NAME.tsq, fetch and "
                       "check NAME.tsr", description="Writes the request NAME.tsq beside the key. With --tsa, sends it "
                       "to that timestamp authority and writes the checked reply NAME.tsr — never over an earlier one: "
                       "that is kept (its date is earlier) and the new reply is NAME-2.tsr; with --reply, checks an "
                       "existing reply. Stamp before you publish (docs/dispute.md).")
    p.add_argument("--key", required=True, help="the private .sealkey file (only read)")
    p.add_argument("--tsa", help="URL of an RFC 3161 timestamp authority (HTTP POST); none: only write the request")
    p.add_argument("--ca", help="the TSA's CA certificate(s), PEM: the reply must chain to it")
    p.add_argument("--reply", help="check this existing .tsr instead of fetching one (needs --ca)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the TSA (default 30)")
    p.set_defaults(func=cmd_timestamp)


def cmd_timestamp(args) -> int:
    from ..ownership.timestamp import stamp_command, stamp_key

    done = stamp_key(args.key, args.tsa, args.ca, args.reply, args.timeout)
    if done["request"]:
        print(f"wrote the timestamp request {done['request']} (commitment {done['commitment']})")
    stamp = done["stamp"]
    if stamp:
        print(f"timestamp OK: commitment {stamp.commitment} existed at {stamp.gen_time} (UTC), signed by {stamp.tsa}")
    if done["reply"] and not stamp:
        print(f"wrote the reply {done['reply']}, not checked against a CA: pass --ca (the TSA's CA certificate)")
    if done.get("kept"):
        print(f"kept the earlier reply {done['kept']} (an earlier date: it is the one that counts in a dispute); the "
              f"new reply is {done['reply']}")
    if not args.tsa and not args.reply:
        print(f"send it to a timestamp authority (before you publish): {stamp_command(args.key)}")
    return 0


def add_commitment_command(sub) -> None:
    p = sub.add_parser("commitment", help="print the SHA-256 commitment of a key (publish it with the LoRA)")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.set_defaults(func=cmd_commitment)


def cmd_commitment(args) -> int:
    from ..core.keyfile import SealKey

    print(SealKey.load(args.key).commitment())
    return 0
