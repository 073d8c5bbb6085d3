"""Where the check from generated images ends: −log10 p of ``verify-images`` for the release and three innocents when a
service renders the challenge differently from what was asked (tiny default, the shipped challenge defaults).

Trains (once, into ``--work``) on one subject a rank-4 SEAL release, a plain LoRA of the same subject and seed, and a
SEAL LoRA of the same subject under another key (tiny, 32 px, 60 steps, seed 0), makes a challenge with the shipped
defaults (``create_challenge``, self-test on), then renders it through diffusers' own ``StableDiffusionPipeline`` +
``load_lora_weights`` (what a service would run) under each condition, saves 8-bit files, and tests every set with the
product's loader and statistic (all residuals from one forward pass per batch). Conditions: as asked; the sampler
(Euler, Euler a, DPM++ 2M instead of DDIM); steps ×2 and 20; CFG ±2.5; LoRA strength 0.5/0.7/0.85; JPEG 75/50;
resize ×0.9/×1.1; centre crop 87.5 % (resized back by the verifier); another output size (1.5×).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/image_check_matrix.py --work /tmp/matrix [--subject cat|coffee|astronaut]
        [--n 32] [--quick]   # --quick: as asked + post-processing only (no extra renders)

Not a test: prints a markdown table (and the self-test score), writes only under ``--work``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLERS = {"Euler": "EulerDiscreteScheduler", "Euler a": "EulerAncestralDiscreteScheduler",
            "DPM++ 2M": "DPMSolverMultistepScheduler"}


INNOCENT_CONDITIONS = ("as asked", "JPEG 50", "sampler Euler", "LoRA strength 0.7")


def train_suspects(work: Path, subject: str) -> tuple[str, dict[str, Path]]:
    """release / plain / other-key SEAL runs for ``subject`` under ``work`` (skipped when already there)."""
    from seal_diffusion.models.subject import INSTANCE_PROMPT, PHOTO_SUBJECTS, write_photo_subject, write_subject
    from seal_diffusion.training import parse_args, train

    prompt = INSTANCE_PROMPT if subject == "cat" else PHOTO_SUBJECTS[subject]
    data = work / f"subject_{subject}"
    if not data.exists():
        write_subject(data) if subject == "cat" else write_photo_subject(data, subject)
    runs = {}
    for kind, extra in (("release", ["--secret", f"owner of {subject} (benchmark)"]),
                        ("plain", ["--method", "lora"]), ("other key", ["--secret", f"someone else {subject}"])):
        out = work / f"{subject}_{kind.replace(' ', '_')}"
        if not (out / "pytorch_lora_weights.safetensors").exists():
            args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(data),
                               "--instance_prompt", prompt, "--output_dir", str(out), "--output_name", subject,
                               "--rank", "4", "--max_train_steps", "60", "--learning_rate", "2e-3", "--seed", "0",
                               "--cache_latents", "--resolution", "32"] + extra)
            train(args)["network"].remove()
        runs[kind] = out
    return prompt, runs


def conditions(ch, quick: bool) -> list[tuple[str, dict, dict]]:
    """(label, render changes, post-processing) for each condition."""
    post = [("JPEG 75", {}, {"quality": 75}), ("JPEG 50", {}, {"quality": 50}),
            ("resize ×0.9", {}, {"scale": 0.9}), ("resize ×1.1", {}, {"scale": 1.1}),
            ("centre crop 87.5 %", {}, {"crop": 0.875})]
    out = [("as asked", {}, {})] + post
    if quick:
        return out
    out += [(f"sampler {k}", {"scheduler": v}, {}) for k, v in SAMPLERS.items()]
    out += [(f"steps {2 * ch.steps}", {"steps": 2 * ch.steps}, {}), ("steps 20", {"steps": 20}, {}),
            (f"CFG {ch.guidance_scale - 2.5:g}", {"guidance_scale": ch.guidance_scale - 2.5}, {}),
            (f"CFG {ch.guidance_scale + 2.5:g}", {"guidance_scale": ch.guidance_scale + 2.5}, {}),
            ("LoRA strength 0.85", {"scale": 0.85}, {}), ("LoRA strength 0.7", {"scale": 0.7}, {}),
            ("LoRA strength 0.5", {"scale": 0.5}, {}),
            (f"size {ch.width * 3 // 2} px", {"size": ch.width * 3 // 2}, {})]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for the trained runs, challenge and images (reused)")
    ap.add_argument("--subject", default="cat", choices=["cat", "coffee", "astronaut", "rocket"])
    ap.add_argument("--n", type=int, default=None, help="images in the challenge (default: the shipped default)")
    ap.add_argument("--quick", action="store_true", help="as asked + post-processing only")
    ap.add_argument("--all-innocent", action="store_true", help="innocents under every condition (default: a subset)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image

    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.detection.image_challenge import DEFAULT_N
    from seal_diffusion.detection.image_check import create_challenge, load_images, owner_reference
    from seal_diffusion.detection.image_check import module_statistics
    from seal_diffusion.detection.image_sampler import directional_statistics, use_scheduler
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.detection.verify import sign_flip_neg_log10_p

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prompt, runs = train_suspects(work, args.subject)
    print(f"training (or reuse): {time.time() - t0:.0f} s", flush=True)
    key_path = next(runs["release"].glob("*.sealkey"))
    pipe = load_pipeline("tiny")
    t0 = time.time()
    ch = create_challenge(key_path, work / f"challenge_{args.subject}.json", prompt=prompt, n=args.n or DEFAULT_N,
                          pipe=pipe, overwrite=True)
    t_challenge = time.time() - t0
    key = SealKey.load(key_path)
    x_mid = owner_reference(key_path, key, ch, pipe)
    suspects = [("release", runs["release"]), ("plain LoRA", runs["plain"]), ("SEAL, other key", runs["other key"]),
                ("base", None)]
    conds = conditions(ch, args.quick)

    def render(lora, change: dict) -> list:
        if lora is not None:
            pipe.load_lora_weights(str(lora), adapter_name="suspect")
            pipe.set_adapters(["suspect"], adapter_weights=[change.get("scale", 1.0)])
        try:
            use_scheduler(pipe, change.get("scheduler", ch.scheduler))
            size = change.get("size", ch.width)
            ims = []
            for s in range(0, ch.n, 8):
                res = pipe(ch.prompts[s:s + 8], num_inference_steps=change.get("steps", ch.steps),
                           guidance_scale=change.get("guidance_scale", ch.guidance_scale), height=size, width=size,
                           generator=[torch.Generator("cpu").manual_seed(x) for x in ch.seeds[s:s + 8]],
                           output_type="pil")
                ims += res.images
        finally:
            if lora is not None:
                pipe.unload_lora_weights()
        return ims

    def save(images, folder: Path, post: dict) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            w, h = im.size
            if "scale" in post:
                im = im.resize((round(w * post["scale"]), round(h * post["scale"])), Image.Resampling.BICUBIC)
            if "crop" in post:
                cw, chh = round(w * post["crop"]), round(h * post["crop"])
                im = im.crop(((w - cw) // 2, (h - chh) // 2, (w - cw) // 2 + cw, (h - chh) // 2 + chh))
            q = post.get("quality")
            paths.append(folder / f"img_{i:03d}.{'jpg' if q else 'png'}")
            im.save(paths[-1], **({"quality": q} if q else {}))
        return paths

    t0 = time.time()
    residuals, cells = [], []
    for name, lora in suspects:
        renders: dict = {}
        for label, change, post in conds:
            if lora is None and "scale" in change:
                continue  # the base model has no LoRA strength
            if name != "release" and not args.all_innocent and label not in INNOCENT_CONDITIONS:
                continue  # the test is exact for every innocent; a subset shows it (CPU time)
            rkey = tuple(sorted(change.items()))
            if rkey not in renders:
                renders[rkey] = render(lora, change)
            folder = work / "images" / args.subject / name.replace(" ", "_").replace(",", "") / \
                label.replace(" ", "_").replace("%", "pc").replace("×", "x")
            residuals.append(load_images(save(renders[rkey], folder, post), ch) - x_mid)
            cells.append((label, name))
    t_render = time.time() - t0
    t0 = time.time()
    per_image = directional_statistics(pipe, key, ch, torch.stack(residuals), list(range(ch.n)))
    d, d_sum = module_statistics(per_image), per_image.sum(1)  # the shipped unit votes; the plain sum beside them
    t_stats = time.time() - t0
    table: dict = {}
    for (label, name), row, row_sum in zip(cells, d, d_sum):
        table.setdefault(label, {})[name] = (sign_flip_neg_log10_p(list(row)), int((row > 0).sum()),
                                             sign_flip_neg_log10_p(list(row_sum)))
    print(f"\nsubject {args.subject} ({prompt!r}); challenge: {ch.n} images, {ch.width} px, {ch.scheduler} "
          f"{ch.steps} steps, CFG {ch.guidance_scale:g}, compare {ch.compare_size} px; {d.shape[1]} modules; "
          f"self-test (owner's release rendered by the owner) {getattr(ch, 'self_test', float('nan')):.1f}")
    print(f"times: challenge {t_challenge:.0f} s, renders {t_render:.0f} s, statistics {t_stats:.0f} s; "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}\n")
    names = [n for n, _ in suspects]
    print("| service renders with | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for label, _, _ in conds:
        cells_ = [f"{table[label][n][0]:.1f} ({table[label][n][1]}; sum {table[label][n][2]:.1f})"
                  if n in table[label] else "—" for n in names]
        print(f"| {label} | " + " | ".join(cells_) + " |")
    print(f"\n−log10 p (modules leaning the released way, of {d.shape[1]}; the same images with the plain sum over "
          "images instead of unit votes); detected from 3.3.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
