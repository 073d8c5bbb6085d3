"""Commands that test ownership: ``verify``, ``scan``, ``challenge``, ``verify-images``, ``dispute``."""

from __future__ import annotations

import argparse

from ..defaults import CHALLENGE_GUIDANCE as DEFAULT_GUIDANCE, CHALLENGE_N as DEFAULT_N, \
    CHALLENGE_STEPS as DEFAULT_STEPS, FUNCTIONAL_PROBES

from .common import Output, add_force, check_first
# library imports are inside the handlers: --help and the other commands do not wait for torch


def add_verify_command(sub) -> None:
    p = sub.add_parser("verify", help="ownership test of a LoRA file/folder or a merged model (exit 0 detected, 1 not)",
                       description="Ownership test (two-sided: also finds a file meant for a negative strength). "
                       "Several SUSPECTs are ONE suspect: the files a user loads together, their weight updates added "
                       "at strengths fitted without the secret coins — this undoes a LoRA split into parts (A = "
                       "original + R at 1, B = -2R at 0.5). To test files separately, use scan.")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("suspect", nargs="+",
                   help="LoRA .safetensors in any layout diffusers/ComfyUI/A1111 load, a diffusers LoRA folder, or a "
                        "full model; several: tested as loaded together (deltas added)")
    p.add_argument("--commitment", metavar="HEX",
                   help="the commitment you published with the LoRA: the key is refused unless it matches")
    p.add_argument("--base", help="base model the suspect was merged into (needed for full models; --functional "
                   "defaults to the base model the key records)")
    p.add_argument("--config", help="local diffusers folder with the configs, for single-file models offline")
    p.add_argument("--json", help="write the report as JSON here")
    add_force(p, "an existing --json file")
    p.add_argument("--threshold", type=float, default=3.3, help="detect when -log10 p >= this (default 3.3, p < 5e-4)")
    p.add_argument("--statistic", default="contrast", choices=["contrast", "correlation"],
                   help="pooled statistic (see docs/verification.md)")
    g = p.add_argument_group("function-level test (survives distillation; base: --base, else the key's base model)")
    g.add_argument("--functional", action="store_true",
                   help="also run the function-level test; the verdict combines both (Bonferroni: p = 2·min p)")
    g.add_argument("--probes", type=int, default=FUNCTIONAL_PROBES,
                   help=f"secret probes of the function test (default {FUNCTIONAL_PROBES})")
    g.add_argument("--probe-size", type=int, help="latent side of the probes (default: half the model's, 16 on tiny, "
                   "32 on SD 1.5; larger costs more per probe)")
    g.add_argument("--prompt", action="append",
                   help="prompt for the probes, e.g. the LoRA's instance prompt (repeatable; default: the "
                   "instance prompt of a README.md beside the key, plus generic prompts)")
    g.add_argument("--no-cache", action="store_true",
                   help="do not read or write the private probe cache beside the key")
    p.set_defaults(func=cmd_verify, check=check_verify)


def check_verify(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.json, "--json"), key=args.key, suspect=args.suspect, base=args.base)


def cmd_verify(args) -> int:
    from ..fileio import write_json_atomic

    if args.functional:
        from ..detection.functional import verify_both  # diffusers (the model) only when the function-level test runs

        report = verify_both(args.key, args.suspect, args.base, threshold=args.threshold, statistic=args.statistic,
                             n_probes=args.probes, prompts=args.prompt, config=args.config,
                             use_cache=not args.no_cache, size=args.probe_size, commitment=args.commitment,
                             show_progress=True)
    else:
        from ..detection.verify import verify_path

        report = verify_path(args.key, args.suspect, base=args.base, threshold=args.threshold,
                             statistic=args.statistic, config=args.config, commitment=args.commitment)
    print(report.summary())
    if args.json:
        write_json_atomic(args.json, report.to_json(), overwrite=args.overwrite)
    return 0 if report.detected else 1


def add_scan_command(sub) -> None:
    p = sub.add_parser("scan", help="verify many files against one or many keys; table of verdicts",
                       description="Verify every file against every key. A file for another model family than a "
                       "key (SDXL vs SD 1.5) is 'not applicable' to it; the exit code is decided by the pairs that "
                       "apply. Exit 0: every applicable pair was checked and at least one detected; 1: none detected; "
                       "2: some pair could not be checked (unreadable, or none of the key's layers found), no pair "
                       "applies, or bad input. Verdicts are Holm-corrected for the applicable files x keys.")
    p.add_argument("--key", required=True, action="append", help="a .sealkey (repeat for several keys)")
    p.add_argument("paths", nargs="+", help="LoRA files or folders (searched for *.safetensors)")
    p.add_argument("--threshold", type=float, default=3.3,
                   help="DETECTED when the Holm-corrected -log10 p >= this (default 3.3, p < 5e-4), corrected for "
                        "files x keys so the whole scan accuses an innocent file with probability < 10^-threshold")
    p.add_argument("--statistic", default="contrast", choices=["contrast", "correlation"],
                   help="contrast (default): exact sign-flip test on <C^, C - C_p>; correlation: the textbook "
                        "Gaussian test on <C^, C>, over-fires on same-subject LoRAs (see docs/verification.md)")
    p.add_argument("--combine", action="store_true",
                   help="also test, per key, all the files of its model family loaded together (strengths fitted "
                        "without the coins): catches a LoRA split into parts")
    p.add_argument("--commitment", action="append", metavar="HEX",
                   help="a published commitment (repeat for several keys): every key must match one, or the scan "
                        "is refused")
    p.add_argument("--json", help="write the rows as JSON here")
    add_force(p, "an existing --json file")
    p.set_defaults(func=cmd_scan, check=check_scan)


def check_scan(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.json, "--json"), key=args.key, suspect=args.paths)


def cmd_scan(args) -> int:
    from tqdm import tqdm

    from ..fileio import write_json_atomic
    from ..detection.scan import CORRECTION, exit_code, format_table, scan

    rows, rate = scan(args.key, args.paths, args.threshold, args.statistic,
                      progress=lambda it: tqdm(it, desc="scanning", unit="file", disable=None),
                      combine=args.combine, commitments=args.commitment)
    print(format_table(rows, args.threshold))
    checked = bool(args.commitment)
    print(f"{len(rows)} verdicts, {rate:.1f} files/s; keys " + ("match the published commitments given" if checked
          else "NOT checked against published commitments (pass --commitment HEX)"))
    if args.json:
        write_json_atomic(args.json, {"rows": [vars(r) for r in rows], "files_per_s": rate, "correction": CORRECTION,
                                      "n_tests": sum(r.applicable for r in rows), "threshold": args.threshold,
                                      "commitment_checked": checked}, overwrite=args.overwrite)
    return exit_code(rows)


def add_challenge_command(sub) -> None:
    p = sub.add_parser("challenge", help="write an image challenge (prompts, seeds, sampler) for the check "
                              "from generated images; renders the owner's private reference beside the key")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--base", default="tiny", help="base model the LoRA runs on (default tiny)")
    p.add_argument("--out", required=True, help="the challenge JSON to write (public: give it to the suspect service)")
    p.add_argument("--prompt", default=None,
                   help="the subject prompt (default: instance_prompt of the model card beside the key)")
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help=f"number of images to ask the service for (default {DEFAULT_N}; fewer lose power, see "
                        "docs/verification.md)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampler steps (default {DEFAULT_STEPS} on the tiny test models, 20 on real models)")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE, help="CFG (default 7.5)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the model's native size; half of it, 32, on tiny)")
    p.add_argument("--compare_size", type=int, default=None, help="side of the comparison grid (default size/2)")
    add_force(p, "an existing --out challenge")
    p.add_argument("--no-self-test", dest="self_test", action="store_false",
                   help="skip rendering the challenge with your own release (the score a service is compared with)")
    p.set_defaults(func=cmd_challenge, check=check_challenge)


def check_challenge(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.out, "--out"), key=args.key, base=args.base)


def _bar(desc: str):
    """A tqdm progress callback for the image check's (done, total, what) reports; one bar per stage."""
    from tqdm import tqdm

    state: dict = {}

    def progress(done: int, total: int, what: str) -> None:
        if state.get("what") != what:
            if state.get("bar") is not None:
                state["bar"].close()
            state.update(what=what, bar=tqdm(total=total, desc=what, unit="img", leave=False), done=0)
        state["bar"].update(done - state["done"])
        state["done"] = done

    def close() -> None:
        if state.get("bar") is not None:
            state["bar"].close()

    progress.close = close  # type: ignore[attr-defined]
    return progress


def cmd_challenge(args) -> int:
    from ..detection.image_check import create_challenge

    progress = _bar("challenge")
    try:
        ch = create_challenge(args.key, args.out, base=args.base, prompt=args.prompt, n=args.n, steps=args.steps,
                              guidance_scale=args.guidance_scale, size=args.size, compare_size=args.compare_size,
                              overwrite=args.overwrite, self_test=args.self_test, progress=progress)
    finally:
        progress.close()
    print(f"wrote {args.out}: {ch.n} prompts/seeds, {ch.scheduler} {ch.steps} steps, CFG {ch.guidance_scale:g}, "
          f"{ch.width}×{ch.height}; private reference beside the key (0600)")
    if getattr(ch, "self_test", None) is not None:
        print(f"self-test: your own release scores −log10 p = {ch.self_test:.1f} on this challenge (threshold 3.3); "
              "a service's images should be compared with that")
    print(f"ask the service for all {ch.n} images exactly as listed (prompt, seed, {ch.scheduler} sampler, "
          f"{ch.steps} steps, CFG {ch.guidance_scale:g}, {ch.width}×{ch.height}, LoRA strength 1, PNG); "
          "see docs/verification.md for what survives other settings")
    return 0


def add_verify_images_command(sub) -> None:
    p = sub.add_parser("verify-images", help="ownership test from images a suspect rendered for a challenge "
                              "(exit 0 detected, 1 not)")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--challenge", required=True, help="the challenge JSON the images answer")
    p.add_argument("images", nargs="+", help="PNG/JPEG/WebP images, in challenge order or named by entry number "
                   "(img_007.png = entry 7, from 0)")
    p.add_argument("--base", default=None, help="base model (default: the challenge's base_model)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    add_force(p, "an existing --json file")
    p.add_argument("--threshold", type=float, default=3.3, help="detect when -log10 p >= this (default 3.3)")
    p.set_defaults(func=cmd_verify_images, check=check_verify_images)


def check_verify_images(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    check_first(args, Output(args.json, "--json"), key=args.key, challenge=args.challenge, image=args.images,
                base=args.base)


def cmd_verify_images(args) -> int:
    from ..fileio import write_json_atomic
    from ..detection.image_check import ROBUSTNESS_NOTE, verify_images

    progress = _bar("verify-images")
    try:
        report = verify_images(args.key, args.challenge, args.images, base=args.base, threshold=args.threshold,
                               progress=progress)
    finally:
        progress.close()
    print(report.summary())
    print(ROBUSTNESS_NOTE)
    if args.json:
        write_json_atomic(args.json, report.to_json(), overwrite=args.overwrite)
    return 0 if report.detected else 1


class _ClaimAction(argparse.Action):
    """``--claim KEY`` starts a claim; ``--timestamp``, ``--commitment`` and ``--file`` attach to the last one."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..ownership.dispute import ClaimInput

        claims = getattr(namespace, "claims", None) or []
        if option_string == "--claim":
            claims.append(ClaimInput(values))
        else:
            if not claims:
                parser.error(f"{option_string} must follow the --claim it belongs to")
            field_name = option_string.lstrip("-")
            if getattr(claims[-1], field_name) is not None:
                parser.error(f"{option_string} given twice for --claim {claims[-1].key}")
            setattr(claims[-1], field_name, values)
        namespace.claims = claims


def add_dispute_command(sub) -> None:
    p = sub.add_parser(
        "dispute", help="who owns SUSPECT: R1, R2, commitment and timestamps per claim; names the earliest valid "
        "claim (exit 0 winner, 1 cannot decide, 2 error)",
        description="Check ownership claims on a suspect LoRA and name the earliest valid one. Each --claim KEY may "
        "be followed by its own --timestamp TSR, --commitment HEX (the value the claimant published) and --file LORA "
        "(the file the claimant published; verified with every other key). See docs/dispute.md.")
    p.add_argument("suspect", help="the disputed LoRA file or folder")
    p.add_argument("--claim", action=_ClaimAction, required=True, metavar="KEY", help="a claimant's .sealkey (repeat)")
    p.add_argument("--timestamp", action=_ClaimAction, metavar="TSR", help="RFC 3161 reply for the previous claim")
    p.add_argument("--commitment", action=_ClaimAction, metavar="HEX", help="commitment published for the previous "
                   "claim")
    p.add_argument("--file", action=_ClaimAction, metavar="LORA", help="LoRA published by the previous claimant")
    p.add_argument("--ca", help="CA certificate(s) of the timestamp authorities, PEM (needed with --timestamp)")
    p.add_argument("--base", help="base model (default: the first key's)")
    p.add_argument("--config", help="local diffusers config folder for a single-file base")
    p.add_argument("--data", help="folder of the subject's images (R2 needs it)")
    p.add_argument("--prompt", default="a photo of sks cat", help="the subject's prompt (default: 'a photo of sks "
                   "cat')")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--out", help="write the Markdown report here")
    add_force(p, "an existing --json/--out report")
    p.set_defaults(func=cmd_dispute, check=check_dispute, claims=None)


def check_dispute(args) -> None:
    """Every output path checked before any work (run by the CLI before the command)."""
    claims = args.claims or []
    check_first(args, Output(args.json, "--json"), Output(args.out, "--out"), suspect=args.suspect,
                key=[c.key for c in claims], timestamp=[c.timestamp for c in claims], file=[c.file for c in claims],
                ca=args.ca, base=args.base)


def cmd_dispute(args) -> int:
    from ..ownership.dispute import dispute
    from ..fileio import write_json_atomic, write_text_atomic

    report = dispute(args.suspect, args.claims, base=args.base, data=args.data, prompt=args.prompt, ca=args.ca,
                     config=args.config)
    print(report.summary())
    if args.json:
        write_json_atomic(args.json, report.to_json(), overwrite=args.overwrite)
    if args.out:
        write_text_atomic(args.out, report.markdown(), overwrite=args.overwrite)
    return report.exit_code
