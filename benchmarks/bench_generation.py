#!/usr/bin/env python
"""Generation with the exported SEAL LoRA vs a plain LoRA of the same rank, both loaded by diffusers. Goal: 1.00×.

The released SEAL file is an ordinary LoRA (the passport is folded into the factors), so once diffusers has loaded it
nothing SEAL-specific runs; this benchmark checks that claim. Both files are written in the same layout and loaded into
*one* pipeline with ``pipe.load_lora_weights(file, adapter_name=…)``; generations alternate between
``set_adapters("seal")`` and ``set_adapters("plain")`` (A B B A …), same prompt, seed and steps.

* default: the embedded tiny pipeline (64² px, 10 steps, CFG 7.5) — also a "LoRA disabled" row for reference;
* ``--sd15``: additionally the real SD 1.5 UNet architecture with random weights at a small size (32² latents,
  4 steps), fed random prompt embeddings (77 × 768) and returning latents (no VAE/text encoder of that size exists
  offline).

    python benchmarks/bench_generation.py [--sd15] [--layout kohya|diffusers] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common as C

GOAL = 1.00


def seal_key_for(unet, rank: int, seed: int = 0):
    """A trained-looking SEAL key for ``unet``: random passports, A kaiming (as initialised), B random (not zero)."""
    import torch

    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.core.network import SealNetwork, find_target_modules
    from seal_diffusion.core.passport import make_passports

    torch.manual_seed(seed)
    net = SealNetwork(unet, rank, rank, make_passports(list(find_target_modules(unet)), rank, b"bench-generation"))
    with torch.no_grad():
        for layer in net.layers:
            layer.lora_B.normal_(0, 0.02)
    key = SealKey.from_network(net, "benchmark", "random")
    net.remove()
    return key, list(net.module_names)


def plain_factors(unet, modules: list[str], rank: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in modules:
        lin = unet.get_submodule(name)
        out[name] = (torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5,
                     torch.randn(lin.out_features, rank, generator=g) * 0.02)
    return out


def bench_pipe(pipe, label: str, rank: int, layout: str, reps: int, warmup: int, call_kwargs: dict,
               with_base: bool, tmp: Path) -> list[C.Row]:
    import torch

    from seal_diffusion.core.export import export_lora
    from seal_diffusion.formats.lora_file import write_lora

    key, modules = seal_key_for(pipe.unet, rank)
    seal_path = export_lora(key, tmp / f"seal_{label}.safetensors", layout)
    plain_path = write_lora(plain_factors(pipe.unet, modules, rank), tmp / f"plain_{label}.safetensors", layout)
    pipe.load_lora_weights(str(seal_path), adapter_name="seal")
    pipe.load_lora_weights(str(plain_path), adapter_name="plain")
    pipe.set_progress_bar_config(disable=True)

    def gen():
        return pipe(generator=torch.Generator().manual_seed(0), **call_kwargs)

    def use(name):
        def f():
            if name == "base":
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters(name)
        return f

    fns = {"seal": gen, "plain": gen}
    before = {"seal": use("seal"), "plain": use("plain")}
    if with_base:
        fns["base"] = gen
        before["base"] = use("base")
    cpu: dict[str, list[float]] = {}
    wall = C.interleaved(fns, reps, warmup, before=before, cpu_times=cpu)
    n = len(modules)
    rows = [
        C.timing_row(f"generation wall time, {label}", wall["seal"], wall["plain"], GOAL,
                     note=f"{layout} files, rank {rank}, {n} modules"),
        C.timing_row(f"generation CPU time, {label}", cpu["seal"], cpu["plain"], GOAL),
    ]
    if with_base:
        rows.append(C.timing_row(f"plain LoRA vs LoRA disabled, {label}", wall["plain"], wall["base"], None,
                                 note="information: what any PEFT LoRA costs at inference"))
    pipe.delete_adapters(["seal", "plain"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="also the SD 1.5 UNet architecture (random weights)")
    p.add_argument("--layout", choices=("kohya", "diffusers"), default="kohya")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=None, help="generations per adapter (default 10 tiny, 3 SD 1.5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", metavar="OUT", help="write results as JSON")
    args = p.parse_args(argv)

    import torch

    from seal_diffusion.models.tiny import build_sd15_unet, build_tiny_components, build_tiny_pipeline

    info = C.machine_info()
    C.print_machine(info)
    rows: list[C.Row] = []
    with tempfile.TemporaryDirectory(prefix="seal-bench-gen-") as tmp:
        tmp = Path(tmp)
        reps = args.reps or 10
        print(f"\n[tiny] 64² px, 10 steps, CFG 7.5: {args.warmup} warm-up + {reps} generations per adapter …",
              flush=True)
        pipe = build_tiny_pipeline()
        rows += bench_pipe(pipe, "tiny default, 64² px, 10 steps", args.rank, args.layout, reps, args.warmup,
                           dict(prompt="a photo of sks dog", num_inference_steps=10, output_type="np"), True, tmp)
        del pipe
        if args.sd15:
            from diffusers import StableDiffusionPipeline

            reps = args.reps or 3
            print(f"\n[sd15] SD 1.5 UNet arch (random weights, fp32), 32² latents, 4 steps, CFG 7.5: "
                  f"{args.warmup} warm-up + {reps} generations per adapter …", flush=True)
            comps = build_tiny_components()
            torch.manual_seed(0)
            comps["unet"] = build_sd15_unet("cpu", torch.float32)
            pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
            g = torch.Generator().manual_seed(3)
            emb, neg = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
            side = 32 * pipe.vae_scale_factor
            rows += bench_pipe(pipe, "SD 1.5 arch, 32² latents, 4 steps", args.rank, args.layout, reps, args.warmup,
                               dict(prompt_embeds=emb, negative_prompt_embeds=neg, height=side, width=side,
                                    num_inference_steps=4, output_type="latent"), False, tmp)
    C.print_table("Generation: exported SEAL LoRA vs plain LoRA, both via load_lora_weights (one pipeline)", rows)
    C.write_json(args.json, "bench_generation", info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
