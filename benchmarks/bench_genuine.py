"""R2 margins: the real owner on ≥ 20 genuine runs vs every forger, with the thresholds of seal_diffusion.ownership.genuine.

Trains N tiny SEAL runs (seeds × ranks 4 and 8 × passport schedules alternate and split; 60 steps each at 64 px, as the
test fixture at its 32 px), measures R2's quantities (difference, spread, function, loss gap) for each owner key, forges claims from
each run's *public* file (pad, nilpotent, outside, flip, optimised; optimised+repel from a random start and from C̃,
the adaptive forger, which passed R2 in 2 of 2 runs on 2026-12-02: docs/dispute.md) and measures them the same way.
Prints one row per run and a margin table: the smallest genuine value and the largest forged value of each measure
against its threshold. Whether each owner also *wins the dispute* against every attack (adaptive forger
undated or stamped later, bad replies, re-saves, a thief's SEAL run on top): ``bench_dispute.py``. Not a timed test; ~1 min per run on a quiet 2-core machine (much more on a loaded one).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_genuine.py [--runs 20] [--forge-every 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_machine  # noqa: E402

MEASURES = (("difference", "min"), ("spread", "min"), ("function", "min"), ("loss_gap", "max"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="genuine runs (default 20)")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60, as the test fixture)")
    p.add_argument("--forge-every", type=int, default=4, help="forge claims from every k-th run (default 4)")
    p.add_argument("--optimise-steps", type=int, default=60, help="steps of the optimising forgers (default 60)")
    p.add_argument("--json", help="write all measurements here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.ownership.forgery import forge, public_modules
    from seal_diffusion.ownership.genuine import MAX_GAP, MIN_DIFFERENCE, MIN_FUNCTION, MIN_SPREAD, check_genuine_pair
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.models.subject import write_subject
    from seal_diffusion.training import parse_args, train

    info = machine_info()
    print_machine(info)
    work = Path(tempfile.mkdtemp(prefix="bench-genuine-"))
    data = write_subject(work / "subject")
    pipe = load_pipeline("tiny")
    prompt = "a photo of sks cat"
    configs = list(itertools.islice(itertools.cycle(itertools.product((4, 8), ("alternate", "split"))), args.runs))
    rows = []

    def measure(kind, run, key):
        t = time.time()
        v = check_genuine_pair(key, pipe, data, prompt, measure_all=True)
        row = dict(kind=kind, run=run, passed=v.passed, seconds=time.time() - t,
                   **{m: v.measurements.get(m) for m, _ in MEASURES}, outside=v.measurements.get("outside"))
        rows.append(row)
        if args.json:  # after every row: a long run that is stopped still leaves its measurements
            Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
        print(f"{kind:16s} run {run:2d}  {'PASS' if v.passed else 'fail'}  diff {row['difference']:.3f}  "
              f"spread {row['spread']:.2f}  function {row['function']:.3f}  gap {row['loss_gap']:+.3f}", flush=True)

    for i, (rank, schedule) in enumerate(configs):
        out = work / f"run{i}"
        targs = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(data),
                            "--instance_prompt", prompt, "--output_dir", str(out), "--output_name", "cat",
                            "--rank", str(rank), "--passport_schedule", schedule, "--max_train_steps",
                            str(args.steps), "--learning_rate", "2e-3", "--seed", str(100 + i), "--cache_latents",
                            "--secret", f"bench {i}"])
        result = train(targs)
        result["network"].remove()
        key = SealKey.load(result["key_path"])
        measure(f"genuine r{rank} {schedule[:5]}", i, key)
        if i % args.forge_every == 0:
            public = public_modules(out)
            for mode in ("pad", "nilpotent", "outside", "flip"):
                measure(f"forged {mode}", i, forge(public, mode, seed=i))
            for repel, start in ((0.0, "random"), (1.0, "random"), (1.0, "C")):
                label = "forged optimised" + (f" +repel from {start}" if repel else "")
                measure(label, i, forge(public, "optimised", seed=i, base=pipe, data=data, prompt=prompt,
                                        steps=args.optimise_steps, repel=repel, start=start))

    thresholds = {"difference": MIN_DIFFERENCE, "spread": MIN_SPREAD, "function": MIN_FUNCTION, "loss_gap": MAX_GAP}
    genuine = [r for r in rows if r["kind"].startswith("genuine")]
    forged = [r for r in rows if r["kind"].startswith("forged")]
    print(f"\ngenuine accepted: {sum(r['passed'] for r in genuine)}/{len(genuine)}; "
          f"forged rejected: {sum(not r['passed'] for r in forged)}/{len(forged)}")
    print("\n| measure | threshold | genuine worst | genuine median | forged (by class: value) |")
    print("|---|---|---|---|---|")
    for m, sense in MEASURES:
        vals = sorted(r[m] for r in genuine)
        worst = vals[0] if sense == "min" else vals[-1]
        by_class = {}
        for r in forged:
            by_class.setdefault(r["kind"][len("forged "):], []).append(r[m])
        fstr = ", ".join(f"{k}: {max(v) if sense == 'min' else min(v):.3f}" for k, v in by_class.items())
        print(f"| {m} ({'≥' if sense == 'min' else '≤'}) | {thresholds[m]} | {worst:.3f} | "
              f"{vals[len(vals) // 2]:.3f} | {fstr} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows, "thresholds": thresholds}, indent=1))
    return 0 if all(r["passed"] for r in genuine) and not any(r["passed"] for r in forged) else 1


if __name__ == "__main__":
    sys.exit(main())
