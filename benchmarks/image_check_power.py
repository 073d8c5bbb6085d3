"""Power and honesty of the check from generated images (``seal-diffusion verify-images``) on the tiny default.

Renders a challenge with each suspect through diffusers' own ``StableDiffusionPipeline`` + ``load_lora_weights`` (what
a service would run), saves 8-bit images, optionally degrades them (JPEG quality 75 after a ±10 % resize), and prints
−log10 p and the number of layers leaning the released way. Suspects: the owner's release, a distilled copy (a fresh
plain LoRA trained here to match the release's UNet noise predictions on random latents/timesteps/prompts), the
innocent LoRA folders given, and the base model. Also prints decoy-key p-values (the release's statistics under
re-drawn release coins; uniform by construction of the test) as a sanity check.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/image_check_power.py --owner RUN_DIR [--innocent DIR …] \\
        [--n 16] [--size 32] [--steps 4] [--compare-size 16] [--distill-steps 300] [--threads 1]

RUN_DIR is a training output folder (``NAME.sealkey`` + ``pytorch_lora_weights.safetensors``), e.g. from
``seal-diffusion train --pretrained_model_name_or_path tiny --rank 4 --max_train_steps 60 …``. Not a test: prints a
table, writes nothing outside a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def distill(key, steps: int, latent: int, out: Path, seed: int = 0) -> Path:
    """A thief's copy without training images: fresh rank-4 plain LoRA, Adam 3e-3, batch 4, random latents."""
    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.core.network import network_from_key
    from seal_diffusion.core.fold import fold
    from seal_diffusion.formats.lora_file import write_lora
    from seal_diffusion.core.network import SealNetwork

    teacher, student = load_pipeline("tiny"), load_pipeline("tiny")
    network_from_key(key, teacher)
    net = SealNetwork(student.unet, 4, passports=None)
    prompts = ["a photo of sks cat", "sks cat on a beach", "a photo of a dog", "a landscape", "a red car",
               "a portrait", "a photo of a cat", "sks cat in the snow", "a house", "flowers", "",
               "a drawing of sks cat"]
    with torch.no_grad():
        embeds = torch.cat([teacher.encode_prompt(p, "cpu", 1, False)[0] for p in prompts])
    opt = torch.optim.Adam(net.trainable_parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, t = torch.randn(4, 4, latent, latent, generator=g), torch.randint(50, 950, (4,), generator=g)
        e = embeds[torch.randint(0, len(prompts), (4,), generator=g)]
        with torch.no_grad():
            target = teacher.unet(x, t, encoder_hidden_states=e).sample
        loss = torch.nn.functional.mse_loss(student.unet(x, t, encoder_hidden_states=e).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    public = {m: fold(a, b, None, net.alpha / net.rank) for m, (a, b) in net.factors().items()}
    return write_lora(public, out, "diffusers", "distilled").parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--owner", required=True, help="training output folder with NAME.sealkey")
    ap.add_argument("--innocent", action="append", default=[], help="LoRA folder/file not derived from the owner")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--compare-size", type=int, default=None)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--distill-latent", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is far faster on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from PIL import Image

    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.evaluation.render import generate
    from seal_diffusion.detection.image_check import create_challenge, verify_images
    from seal_diffusion.detection.image_sampler import use_scheduler
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.detection.verify import sign_flip_neg_log10_p

    tmp = Path(tempfile.mkdtemp(prefix="image-check-power-"))
    owner = Path(args.owner)
    key_path = shutil.copyfile(next(owner.glob("*.sealkey")), tmp / "owner.sealkey")
    key = SealKey.load(key_path)
    pipe = load_pipeline("tiny")
    ch = create_challenge(key_path, tmp / "challenge.json", prompt="a photo of sks cat", n=args.n, steps=args.steps,
                          size=args.size, compare_size=args.compare_size, pipe=pipe)
    suspects = [("release", owner)]
    if args.distill_steps:
        t0 = time.time()
        suspects.append((f"distilled ({args.distill_steps} steps)",
                         distill(key, args.distill_steps, args.distill_latent, tmp / "distilled")))
        print(f"distillation: {time.time() - t0:.0f} s", flush=True)
    suspects += [(f"innocent {Path(p).name}", Path(p)) for p in args.innocent] + [("base model", None)]

    def render(lora, tag):
        if lora is not None:
            pipe.load_lora_weights(str(lora), adapter_name=tag.replace(" ", "_").replace("(", "").replace(")", ""))
        try:
            use_scheduler(pipe, ch.scheduler)
            ims = generate(pipe, list(zip(ch.prompts, ch.seeds)), steps=ch.steps, guidance_scale=ch.guidance_scale,
                           height=ch.height, width=ch.width, batch_size=8)
        finally:
            if lora is not None:
                pipe.unload_lora_weights()
        return [Image.fromarray((im * 255).round().astype("uint8")) for im in ims]

    def save(images, folder, scale=1.0, quality=None):
        folder.mkdir(parents=True)
        paths = []
        for i, im in enumerate(images):
            if scale != 1.0:
                im = im.resize((round(ch.width * scale), round(ch.height * scale)), Image.Resampling.BICUBIC)
            paths.append(folder / f"img_{i:03d}.{'jpg' if quality else 'png'}")
            im.save(paths[-1], **({"quality": quality} if quality else {}))
        return paths

    print(f"challenge: {ch.n} images, {ch.width}px, {ch.scheduler} {ch.steps} steps, CFG {ch.guidance_scale:g}, "
          f"compare {ch.compare_size}px; torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print("| suspect | images | −log10 p | layers + | detected | s |\n|---|---|---|---|---|---|")
    release_d = None
    for k, (name, lora) in enumerate(suspects):
        images = render(lora, name)
        variants = [("PNG", 1.0, None)]
        if k < 2:
            variants += [("JPEG 75, resized ×0.9", 0.9, 75), ("JPEG 75, resized ×1.1", 1.1, 75)]
        for j, (what, scale, quality) in enumerate(variants):
            t0 = time.time()
            rep = verify_images(key_path, tmp / "challenge.json", save(images, tmp / f"s{k}v{j}", scale, quality),
                                pipe=pipe)
            print(f"| {name} | {what} | {rep.neg_log10_p:.2f} | {rep.n_positive}/{rep.n_modules} | "
                  f"{'yes' if rep.detected else 'no'} | {time.time() - t0:.0f} |", flush=True)
            if k == 0 and j == 0:
                release_d = np.array([m["stat"] for m in rep.per_module])
    rng = np.random.default_rng(0)
    p = np.array([10 ** -sign_flip_neg_log10_p(list(release_d * rng.choice([-1, 1], release_d.size)))
                  for _ in range(1000)])
    print(f"decoy keys (1000 re-drawn coin vectors): P(p<0.05) = {(p < 0.05).mean():.3f}, "
          f"P(p<0.5) = {(p < 0.5).mean():.3f}, detections at 3.3: {(p < 10 ** -3.3).sum()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
