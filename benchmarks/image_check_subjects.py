"""The check from generated images with the shipped defaults, over subjects and challenges: the release and three
innocents, scored with the shipped statistic (unit votes: every image's terms over the modules scaled to length 1,
then summed) and with the plain sum over images beside it, on the same images.

Per subject (``--subjects``; the bundled cat and scikit-image photos) trains, once into ``--work``, a rank-4 SEAL
release, a plain LoRA of the same subject and seed, and a SEAL LoRA of the same subject under another key (tiny, 32 px,
60 steps, seed 0: ``image_check_matrix.train_suspects``). Per challenge (``--challenges`` of them, seeds drawn from
``--seed``; the shipped defaults: 32 images, 32 px, DDIM 4 steps, CFG 7.5, compare size 16): the release as the owner's
self-test renders it (8-bit), the innocents and the base model rendered through diffusers (``load_lora_weights``),
and every image's terms D[i, l] from the product's sampler (:func:`directional_statistics`); both statistics are
computed from the same D. Prints one row per suspect, one cell per subject × challenge: −log10 p (modules of 48
leaning the released way), unit votes / plain sum.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/image_check_subjects.py --work /tmp/subjects \\
        [--subjects cat,coffee,astronaut,rocket] [--challenges 3] [--threads 1] [--json OUT]

Cost on one core of the 2-core machine: ~15 s per trained run, ~70 s per subject × challenge. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_check_matrix import train_suspects  # noqa: E402  (the same trained suspects as the matrix)

SUSPECTS = ("release", "plain LoRA", "SEAL, other key", "base")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the trained runs (reused)")
    ap.add_argument("--subjects", default="cat,coffee,astronaut,rocket")
    ap.add_argument("--challenges", type=int, default=3, help="challenges per subject (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="draws the challenges' seeds (default 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the cells here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.defaults import CHALLENGE_STEPS
    from seal_diffusion.detection.image_challenge import DEFAULT_N, make_challenge
    from seal_diffusion.detection.image_check import module_statistics
    from seal_diffusion.detection.image_sampler import challenge_scheduler, directional_statistics, \
        render_midpoint, render_release, to_compare_space
    from seal_diffusion.detection.verify import sign_flip_neg_log10_p
    from seal_diffusion.evaluation.render import generate
    from seal_diffusion.models.base_model import load_pipeline

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("tiny")
    rng = np.random.default_rng(args.seed)
    cells: list[dict] = []
    for subject in args.subjects.split(","):
        prompt, runs = train_suspects(work, subject)
        key = SealKey.load(next(runs["release"].glob("*.sealkey")))
        for c in range(args.challenges):
            t0 = time.time()
            ch = make_challenge(key, "tiny", prompt, n=DEFAULT_N, size=32, steps=CHALLENGE_STEPS, compare_size=16,
                                seeds=[int(s) for s in rng.integers(0, 2 ** 31, DEFAULT_N)])

            def rendered(folder):
                if folder is not None:
                    pipe.load_lora_weights(str(folder), adapter_name="suspect")
                try:
                    with challenge_scheduler(pipe, ch.scheduler):
                        ims = generate(pipe, list(zip(ch.prompts, ch.seeds)), steps=ch.steps,
                                       guidance_scale=ch.guidance_scale, height=ch.height, width=ch.width,
                                       batch_size=16)
                finally:
                    if folder is not None:
                        pipe.unload_lora_weights()
                x = torch.from_numpy((np.round(ims * 255) / 255).astype(np.float32)).permute(0, 3, 1, 2)
                return to_compare_space(x, ch.compare_size)

            x_mid = render_midpoint(pipe, key, ch)
            images = [render_release(pipe, key, ch), rendered(runs["plain"]), rendered(runs["other key"]),
                      rendered(None)]
            per_image = directional_statistics(pipe, key, ch, torch.stack([x - x_mid for x in images]),
                                               list(range(ch.n)))
            for name, terms in zip(SUSPECTS, per_image):
                votes, plain = module_statistics(terms), terms.sum(0)
                cells.append(dict(subject=subject, challenge=c, suspect=name,
                                  votes=sign_flip_neg_log10_p(list(votes)), votes_pos=int((votes > 0).sum()),
                                  sum=sign_flip_neg_log10_p(list(plain)), sum_pos=int((plain > 0).sum()),
                                  modules=int(terms.shape[1])))
            print(f"{subject} challenge {c}: {time.time() - t0:.0f} s", flush=True)

    subjects = list(dict.fromkeys(c["subject"] for c in cells))
    heads = [f"{s} {c + 1}" for s in subjects for c in range(args.challenges)]
    print(f"\n−log10 p with the shipped defaults ({DEFAULT_N} images, 32 px, DDIM {CHALLENGE_STEPS} steps, CFG 7.5, "
          "compare 16): unit votes (modules of 48 leaning the released way) / plain sum; detected from 3.3\n")
    print("| suspect | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for name in SUSPECTS:
        row = [c for c in cells if c["suspect"] == name]
        print(f"| {name} | " + " | ".join(f"{c['votes']:.1f} ({c['votes_pos']}) / {c['sum']:.1f}" for c in row) + " |")
    for name in SUSPECTS:
        v = [c["votes"] for c in cells if c["suspect"] == name]
        s = [c["sum"] for c in cells if c["suspect"] == name]
        print(f"{name}: unit votes {min(v):.1f}–{max(v):.1f}, plain sum {min(s):.1f}–{max(s):.1f}"
              + (f"; detected {sum(x >= 3.3 for x in v)}/{len(v)} vs {sum(x >= 3.3 for x in s)}/{len(s)}"
                 if name == "release" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
