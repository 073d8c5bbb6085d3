#!/usr/bin/env python
"""SEAL vs plain-LoRA training step: time and peak memory, same UNet, rank and batch. Goal: SEAL ≤ 1.02× plain LoRA.

Time: one process, one UNet; the SEAL network and the plain network (SealNetwork with passports=None) are both built
on it and patched in alternately (A B B A …) between steps, so both see the same weights, caches and machine load.
Memory: one fresh process per (config, method); the kernel's peak-RSS counter (VmHWM) is reset after the model and
adapter are built, so the peak covers exactly the training steps (see README.md for why not tracemalloc).

    python benchmarks/bench_training.py --quick            # tiny default only (~1 min)
    python benchmarks/bench_training.py --sd15             # + real SD 1.5 architecture at 256² and 512² (~5–10 min)
    python benchmarks/bench_training.py --sdxl             # + tiny-xl and the real SDXL architecture at 256² (~10 min)
    python benchmarks/bench_training.py --sd15 --json out/bench_training.json
"""

from __future__ import annotations

import gc
import sys

import _common as C
import _harness as H

GOAL = 1.02


def time_config(config: str, rank: int, reps: int, warmup: int, unet=None) -> tuple[list[float], list[float], dict]:
    cfg = H.CONFIGS[config]
    unet = unet if unet is not None else H.build_unet(cfg["unet"])
    seal = H.make_adapter("seal", unet, rank)
    lora = H.make_adapter("lora", unet, rank)
    inputs = H.make_inputs(unet, cfg)
    steps = {"seal": H.make_step(seal, inputs, cfg["bf16"]), "lora": H.make_step(lora, inputs, cfg["bf16"])}
    active = {"name": None}

    def switch_to(adapter):
        def f():
            if active["name"] != adapter.name:
                for a in (seal, lora):
                    a.deactivate()
                adapter.activate()
                active["name"] = adapter.name
        return f

    cpu: dict[str, list[float]] = {}
    times = C.interleaved(steps, reps, warmup, before={"seal": switch_to(seal), "lora": switch_to(lora)},
                          cpu_times=cpu)
    seal.deactivate()
    lora.deactivate()
    return times, cpu, dict(n_modules=seal.n_modules, params=sum(p.numel() for p in seal.params))


def micro_layer(d_in: int, d_out: int, tokens: int, rank: int, bf16: bool, reps: int) -> tuple[dict, dict]:
    """One adapted Linear alone, forward + backward (input requires grad, as inside the UNet), SEAL vs plain."""
    import contextlib

    import torch

    from seal_diffusion.core.layer import SealLoRALayer
    from seal_diffusion.core.passport import make_passports

    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = torch.nn.Linear(d_in, d_out).to(dtype).requires_grad_(False)
    c, c_p = make_passports(["m"], rank, b"micro")["m"]
    seal = SealLoRALayer("m", base, rank, rank, c, c_p)
    lora = SealLoRALayer("m", base, rank, rank)
    for layer in (seal, lora):
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    x = torch.randn(tokens, d_in, dtype=dtype)

    def run(layer):
        def f():
            xi = x.detach().requires_grad_(True)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                y = layer(xi)
            y.float().sum().backward()
        return f

    def use(layer):
        def f():
            seal.unpatch()
            lora.unpatch()
            layer.patch()
        return f

    cpu: dict[str, list[float]] = {}
    times = C.interleaved({"seal": run(seal), "lora": run(lora)}, reps, 3,
                          before={"seal": use(seal), "lora": use(lora)}, cpu_times=cpu)
    seal.unpatch()
    lora.unpatch()
    return times, cpu


def main(argv=None) -> int:
    p = H.step_bench_parser(__doc__, ["256", "512"], "SD 1.5 pixel resolutions to run (default both)")
    p.add_argument("--mem-steps", type=int, default=1, help="steps after the first in each memory process (SD 1.5)")
    p.add_argument("--no-micro", action="store_true", help="skip the single-layer micro-benchmark")
    p.add_argument("--micro-reps", type=int, default=200, help="reps per method of the single-layer benchmark")
    args = p.parse_args(argv)
    started = H.start(args)
    if started is None:
        return 0
    info, configs = started
    rows: list[C.Row] = []
    extra: dict = {"configs": {}}

    sd15_unet = None
    for config in configs:
        cfg = H.CONFIGS[config]
        reps = H.reps_for(args, config)
        print(f"\n[{config}] {cfg['label']}, rank {args.rank}: timing {args.warmup} warm-up + {reps} steps per method, "
              "interleaved …", flush=True)
        unet = None
        if cfg["unet"] == "sd15":
            if sd15_unet is None:
                sd15_unet = H.build_unet("sd15")
            unet = sd15_unet
        wall, cpu, meta = time_config(config, args.rank, reps, args.warmup, unet)
        rows.append(C.timing_row(f"step wall time, {cfg['label']}", wall["seal"], wall["lora"], GOAL,
                                 note=f"{meta['n_modules']} modules"))
        rows.append(C.timing_row(f"step CPU time, {cfg['label']}", cpu["seal"], cpu["lora"], GOAL))
        print(f"  SEAL median {C.median(wall['seal']):.4f} s, LoRA median {C.median(wall['lora']):.4f} s", flush=True)
        extra["configs"][config] = dict(cfg, rank=args.rank, reps=reps, **meta)
        gc.collect()

    if sd15_unet is not None:
        del sd15_unet
        gc.collect()

    if not args.no_micro:
        # the largest SD 1.5 attention layer at 512² (4096 tokens × 320) and a tiny-default one (1024 tokens × 32)
        shapes = [(32, 32, 4 * 1024, False), (320, 320, 4096, True), (320, 320, 4096, False)]
        if any(H.CONFIGS[c]["unet"] == "sdxl" for c in configs):
            # SDXL at its native 1024²: self-attention at level 1 (4096 tokens × 640) and 2 (1024 × 1280), and a
            # cross-attention K/V (77 text tokens, 2048 → 1280), the layer kind where SEAL's fixed extra weighs most
            shapes += [(640, 640, 4096, True), (1280, 1280, 1024, True), (2048, 1280, 77, True)]
        for d_in, d_out, tokens, bf16 in shapes:
            label = f"one adapted Linear {d_in}→{d_out}, {tokens} tokens, {'bf16 autocast' if bf16 else 'fp32'}, fwd+bwd"
            print(f"\n[micro] {label} …", flush=True)
            wall, cpu = micro_layer(d_in, d_out, tokens, args.rank, bf16, args.micro_reps)
            note = ("tiny layer: the few extra small ops (C·A, its backward) weigh against a 32-wide matmul"
                    if d_in <= args.rank else "")
            rows.append(C.timing_row(f"{label} (wall)", wall["seal"], wall["lora"], None, note))
            rows.append(C.timing_row(f"{label} (CPU)", cpu["seal"], cpu["lora"], None))

    if not args.no_memory:
        for config in configs:
            cfg = H.CONFIGS[config]
            steps = 3 if config == "tiny" else args.mem_steps
            print(f"\n[{config}] peak memory: one fresh process per method, {1 + steps} steps each …", flush=True)
            res = {m: C.run_worker(__file__, ["--_worker", config, m, str(args.rank), str(steps)])
                   for m in ("lora", "seal")}
            s, l = res["seal"], res["lora"]
            for key in ("peak_mib", "delta_mib"):
                what = "peak RSS during steps" if key == "peak_mib" else "RSS added by training steps"
                rows.append(C.Row(f"{what}, {cfg['label']}", s[key], l[key], "MiB", f"≤ {GOAL:.2f}×", GOAL,
                                  note="" if s["peak_reset"] else "VmHWM not resettable: peak includes setup"))
            extra["configs"].setdefault(config, {})["memory"] = res

    C.print_table("SEAL vs plain LoRA, training step (same UNet, rank, batch; measured in one run)", rows)
    C.write_json(args.json, "bench_training", info, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
