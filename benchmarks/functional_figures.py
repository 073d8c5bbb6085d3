#!/usr/bin/env python
"""README / docs figures of the function-level test with the shipped defaults, on several subjects.

Per subject: ``seal-diffusion train`` with nothing but the required arguments (rank 32, 300 steps, lr 1e-5, batch 4,
the tiny default), then the shipped ``verify --functional`` defaults (8 probes, the model's probe size) on the release,
on a distilled copy (``attack distill`` defaults unless ``--distill-steps``), and on a plain LoRA of the same subject
(``--method lora``, the innocent). Subjects: the bundled cat and crops of scikit-image's sample photos.

    python benchmarks/functional_figures.py [--subjects cat chelsea coffee astronaut] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = {"cat": "a photo of sks cat", "chelsea": "a photo of sks cat", "coffee": "a photo of sks cup",
           "astronaut": "a photo of sks person"}


def write_photo_subject(name: str, out: Path, n: int = 5, size: int = 64) -> Path:
    """``n`` square crops (random position, 60–90 % of the short side) of a scikit-image sample photo."""
    import numpy as np
    import skimage.data
    from PIL import Image

    img = getattr(skimage.data, name)()
    rng = np.random.default_rng(0)
    h, w = img.shape[:2]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        side = int(min(h, w) * rng.uniform(0.6, 0.9))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC).save(out / f"{name}_{i}.png")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", nargs="+", default=["cat", "chelsea"])
    ap.add_argument("--out", default="functional-figures")
    ap.add_argument("--distill-steps", type=int, default=400, help="0: no distilled copy")
    ap.add_argument("--train-arg", action="append", default=[],
                    help="extra trainer argument (repeatable, e.g. --train-arg=--max_train_steps=100)")
    ap.add_argument("--innocent", action="store_true", help="also a plain LoRA of the same subject")
    args = ap.parse_args()

    from seal_diffusion.attacks.distill import distill_lora
    from seal_diffusion.detection.functional import verify_both
    from seal_diffusion.models.subject import write_subject
    from seal_diffusion.training import parse_args, train

    out = Path(args.out)
    rows = []
    for subject in args.subjects:
        folder = out / subject
        data = write_subject(folder / "data") if subject == "cat" else write_photo_subject(subject, folder / "data")
        t0 = time.perf_counter()
        res = train(parse_args(["--instance_data_dir", str(data), "--instance_prompt", PROMPTS[subject],
                                "--output_dir", str(folder / "seal"), "--output_name", subject, *args.train_arg]))
        res["network"].remove()
        t_train = time.perf_counter() - t0
        suspects = {"release": res["lora_path"]}
        t0 = time.perf_counter()
        if args.distill_steps:
            suspects["distilled copy"] = str(distill_lora(res["lora_path"], folder / "copy.safetensors",
                                                          steps=args.distill_steps).path)
        t_distill = time.perf_counter() - t0
        if args.innocent:
            inn = train(parse_args(["--instance_data_dir", str(data), "--instance_prompt", PROMPTS[subject],
                                    "--output_dir", str(folder / "plain"), "--output_name", "plain",
                                    "--method", "lora"]))
            inn["network"].remove()
            suspects["same-subject plain LoRA"] = inn["lora_path"]
        for label, path in suspects.items():
            t0 = time.perf_counter()
            rep = verify_both(res["key_path"], path)
            rows.append(dict(subject=subject, suspect=label, weight=rep.weight.neg_log10_p,
                             functional=rep.functional.neg_log10_p, combined=rep.neg_log10_p,
                             n_positive=rep.functional.n_positive, n_modules=rep.functional.n_modules,
                             seconds=time.perf_counter() - t0))
            print(json.dumps(rows[-1]), flush=True)
        print(json.dumps(dict(subject=subject, train_s=t_train, distill_s=t_distill)), flush=True)
    (out / "figures.json").write_text(json.dumps(rows, indent=1))
    print("| subject | suspect | weight | function | combined |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['subject']} | {r['suspect']} | {r['weight']:.1f} | {r['functional']:.1f} "
              f"({r['n_positive']}/{r['n_modules']}) | {r['combined']:.1f} |")


if __name__ == "__main__":
    main()
