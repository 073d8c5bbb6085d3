#!/usr/bin/env python
"""How often the demo's distilled copy is caught: the demo's owner (a fresh key each time), its distilled copies at
the given step counts, and ``verify --functional``'s combined −log10 p with the shipped defaults (12 probes).

Each demo run draws a fresh key, so the demo's "distilled copy: DETECTED" row varies from run to run; this prints one
line per owner so the tail can be read (``seal_diffusion/demo.py: DISTILL_STEPS`` quotes it). About 2 minutes per owner
with two step counts on one core; run two processes side by side on two cores.

    python benchmarks/demo_distill_power.py [--owners 6] [--steps 300,600]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owners", type=int, default=6)
    ap.add_argument("--steps", default="300,600", help="distillation step counts, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    steps_list = [int(x) for x in args.steps.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    from seal_diffusion import demo as D
    from seal_diffusion.attacks.distill import distill_lora
    from seal_diffusion.detection.functional import verify_both
    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.models.subject import write_subject

    work = Path(tempfile.mkdtemp(prefix="demo-distill-power-"))
    subject = write_subject(work / "subject")
    pipe = load_pipeline("tiny")
    scores: dict[int, list[float]] = {s: [] for s in steps_list}
    for i in range(args.owners):
        t = time.time()
        out = work / f"owner{i}"
        seal = D._train(out / "seal", subject, "seal", 0, D.DEMO_STEPS, D.DEMO_RANK)  # the demo's owner, fresh key
        seal["network"].remove()
        parts = []
        for steps in steps_list:
            res = distill_lora(seal["lora_path"], out / f"distilled{steps}.safetensors", base="tiny", rank=D.DEMO_RANK,
                               steps=steps, batch=2, latent_size=D.DISTILL_LATENT, fidelity_inputs=8, overwrite=True)
            both = verify_both(seal["key_path"], res.path, "tiny", pipe=pipe)
            scores[steps].append(both.neg_log10_p)
            parts.append(f"{steps} steps: weight {both.weight.neg_log10_p:.1f}, function {both.functional.neg_log10_p:.1f} "
                         f"({both.functional.n_positive}/{both.functional.n_modules}), combined {both.neg_log10_p:.1f}, "
                         f"fidelity {res.fidelity:.3f}")
        print(f"owner {i}: " + " | ".join(parts) + f" ({time.time() - t:.0f} s)", flush=True)
    for steps, xs in scores.items():
        print(f"{steps} steps: combined min {min(xs):.1f}, median {statistics.median(xs):.1f}, mean "
              f"{statistics.fmean(xs):.1f}; below 3.3: {sum(x < 3.3 for x in xs)} of {len(xs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
