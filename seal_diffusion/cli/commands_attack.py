"""Commands that attack a LoRA: ``attack`` (one attack, or a forged passport) and ``robustness`` (the matrix)."""

from __future__ import annotations

from ..defaults import THRESHOLD as DEFAULT_THRESHOLD
from ..errors import UserError
from .common import Output, add_force, check_first

# what run_robustness() writes into --out (robustness_report.write_report)
ROBUSTNESS_FILES = ("report.md", "report.json", "attacks.png", "pruning.png", "finetune.png", "gamma.png",
                    "innocents.png")

# library imports are inside the handlers: --help and the other commands do not wait for torch


def add_attack_command(sub) -> None:
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
    add_force(p, "an existing OUT")
    p.set_defaults(func=cmd_attack, check=check_attack)


def _attack_output(args) -> Output:
    if args.method == "merge-checkpoint" and not str(args.output).endswith(".safetensors"):
        return Output(args.output, "OUT", folder=True, whole=True, marker="model_index.json")
    return Output(args.output, "OUT", key=args.method == "ambiguity")


def check_attack(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, _attack_output(args), input=args.input, other=args.other, base=args.base, data=args.data)


def cmd_attack(args) -> int:
    method = args.method
    if args.steps is None:
        args.steps = 400 if method == "distill" else 100
    if args.lr is None:
        args.lr = 3e-3 if method == "distill" else 5e-5
    if method == "distill":
        from ..attacks.distill import distill_lora

        res = distill_lora(args.input, args.output, base=args.base or "tiny", rank=args.rank or 4, steps=args.steps,
                           lr=args.lr, seed=args.seed, source=args.source, config=args.config,
                           overwrite=args.overwrite, show_progress=True)
        print(f"distill: wrote {res.path} (rank {res.rank}, {res.steps} steps; fidelity kept {res.fidelity:.3f})")
        return 0
    if method == "merge-checkpoint":
        if not args.base:
            raise UserError("attack merge-checkpoint: --base MODEL is required")
        from ..attacks import file_attacks as attacks

        out = attacks.merge_into_checkpoint(args.input, args.base, args.output, weight=args.weight,
                                            config=args.config, overwrite=args.overwrite)
    elif method == "finetune":
        from ..attacks.finetune import finetune_lora  # lazy: it imports training (accelerate, diffusers: ~5 s)

        out = finetune_lora(args.input, args.output, data=args.data, base=args.base or "tiny", steps=args.steps,
                            learning_rate=args.lr, seed=args.seed, overwrite=args.overwrite, config=args.config)
    elif method == "ambiguity":
        from ..ownership.claim import forge_key

        out = forge_key(args.input, args.output, mode=args.mode, gamma=args.gamma, seed=args.seed,
                        data=args.data, base=args.base, steps=args.steps, overwrite=args.overwrite)
    else:
        from ..attacks import file_attacks as attacks
        from ..formats.lora_file import read_lora

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


def add_robustness_command(sub) -> None:
    p = sub.add_parser("robustness", help="run the attack matrix; report.md, report.json, plots")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--lora", required=True, help="the released LoRA (kohya file or diffusers file/folder)")
    p.add_argument("--base", default="tiny", help="base model: tiny, hub id, diffusers folder or .safetensors")
    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file base")
    p.add_argument("--data", default=None, help="folder of subject images (default: the bundled subject)")
    p.add_argument("--prompt", default="a photo of sks cat", help="instance prompt of the subject")
    p.add_argument("--out", required=True, help="output folder (report.md, report.json, *.png)")
    p.add_argument("--quick", action="store_true", help="the small matrix (about a minute on the tiny model)")
    p.add_argument("--finetune-lr", dest="finetune_lr", type=float, nargs="+", default=None,
                   help="learning rate(s) of the fine-tuning attack (default 5e-5, the paper's LoRA rate)")
    p.add_argument("--finetune-steps", dest="finetune_steps", type=int, nargs="+", default=None,
                   help="fine-tune step counts (default 25 50 100; quick: 8)")
    p.add_argument("--trained-innocents", dest="trained_innocents", type=int, default=None,
                   help="same-subject plain LoRAs to train as innocents (default 2; quick: 0)")
    p.add_argument("--distill", nargs="+", default=None, metavar="RANK:STEPS",
                   help="distillation rows (student rank:steps; default 4:100 4:400; quick: none); each row "
                   "reports fidelity kept, the weight test and the function-level test")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="detection threshold on −log10 p")
    p.add_argument("--seed", type=int, default=0)
    add_force(p, "the report files of an earlier run in --out")
    p.set_defaults(func=cmd_robustness, check=check_robustness)


def _distill_specs(specs) -> list[tuple[int, int]] | None:
    if specs is None:
        return None
    out = []
    for spec in specs:
        r, _, n = str(spec).partition(":")
        try:
            out.append((int(r), int(n)))
        except ValueError:
            raise UserError(f"--distill {spec!r}: expected RANK:STEPS, e.g. 4:400") from None
    return out


def check_robustness(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.out, "--out", folder=True, writes=ROBUSTNESS_FILES), key=args.key, lora=args.lora,
                base=args.base, data=args.data)


def cmd_robustness(args) -> int:
    from tqdm import tqdm

    from ..reports.robustness import run_robustness  # it imports training (accelerate, diffusers: ~5 s)

    bar = tqdm(total=1, desc="robustness", unit="step", dynamic_ncols=True, disable=None)

    def progress(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_description_str(label[:48])
        bar.refresh()

    try:
        report = run_robustness(args.key, args.lora, args.base, args.data, args.out, quick=args.quick,
                                progress=progress, prompt=args.prompt, config=args.config, threshold=args.threshold,
                                seed=args.seed, finetune_lrs=args.finetune_lr, finetune_steps=args.finetune_steps,
                                trained_innocents=args.trained_innocents, distill=_distill_specs(args.distill))
    finally:
        bar.close()
    for a in report["attacks"]:
        print(f"{a['attack']:<60} −log10 p {a['neg_log10_p']:6.2f}  {'detected' if a['detected'] else 'NOT detected'}")
    for d in (report.get("distillation") or {}).get("rows", []):
        print(f"{d['attack']:<44} fidelity {d['fidelity_kept']:.3f}  weight {d['neg_log10_p']:5.2f}  "
              f"function {d['functional_neg_log10_p']:5.2f}  {'detected' if d['combined_detected'] else 'NOT detected'}")
    inn = report["innocents"]
    print(f"innocents: {inn['neg_log10_p']['false_positives']} of {inn['n']} detected "
          f"(95 % upper bound {inn['neg_log10_p']['upper_95']:.2%}); claims fail from γ = {report['gamma_threshold']}")
    files = report["files"]
    print(f"wrote {files['report_md']}, {files['report_json']} and plots ({report['seconds']:.0f} s)")
    return 0
