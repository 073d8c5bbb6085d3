#!/usr/bin/env python
"""Our plain-LoRA training step (SealNetwork, passports=None) vs diffusers' own PEFT LoRA. Goal: ours ≤ 1.00× PEFT.

Both adapt the same 4 projections of every Attention (to_q, to_k, to_v, to_out.0) with the same rank and alpha = rank,
fp32 trainable factors, on two copies of one UNet (PEFT rewrites the module tree, so it cannot share the UNet with our
patch). Steps are interleaved A B B A …; the inputs are identical. With ``--with-seal`` (default on the tiny model)
SEAL is timed against PEFT too, as information.

    python benchmarks/bench_vs_peft.py --quick          # tiny default only
    python benchmarks/bench_vs_peft.py --sd15 --json out/bench_vs_peft.json
"""

from __future__ import annotations

import gc
import sys

import _common as C
import _harness as H

GOAL = 1.00


def time_config(config: str, rank: int, reps: int, warmup: int, with_seal: bool):
    cfg = H.CONFIGS[config]
    unet_a = H.build_unet(cfg["unet"])
    unet_b = H.copy_unet(unet_a)  # identical weights
    ours = H.make_adapter("lora", unet_a, rank)
    seal = H.make_adapter("seal", unet_a, rank) if with_seal else None
    peft = H.make_adapter("peft", unet_b, rank)
    if ours.n_modules != peft.n_modules:
        raise RuntimeError(f"module counts differ: ours {ours.n_modules}, PEFT {peft.n_modules}")
    inputs = H.make_inputs(unet_a, cfg)
    fns = {"ours": H.make_step(ours, inputs, cfg["bf16"]), "peft": H.make_step(peft, inputs, cfg["bf16"])}
    if seal is not None:
        fns["seal"] = H.make_step(seal, inputs, cfg["bf16"])
    on_a = {"name": None}

    def use(adapter):
        def f():
            if on_a["name"] != adapter.name:
                for a in (ours, seal):
                    if a is not None:
                        a.deactivate()
                adapter.activate()
                on_a["name"] = adapter.name
        return f

    before = {"ours": use(ours)}
    if seal is not None:
        before["seal"] = use(seal)
    cpu: dict[str, list[float]] = {}
    wall = C.interleaved(fns, reps, warmup, before=before, cpu_times=cpu)
    return wall, cpu, ours.n_modules


def main(argv=None) -> int:
    p = H.step_bench_parser(__doc__, ["256"], "SD 1.5 pixel resolutions (default 256; 512 takes ~6–9 s per step per "
                            "method)")
    p.add_argument("--with-seal", action="store_true", help="time SEAL against PEFT on SD 1.5 too")
    args = p.parse_args(argv)
    started = H.start(args)
    if started is None:
        return 0
    info, configs = started
    rows: list[C.Row] = []
    extra: dict = {"configs": {}}
    for config in configs:
        cfg = H.CONFIGS[config]
        reps = H.reps_for(args, config)
        with_seal = config == "tiny" or args.with_seal
        print(f"\n[{config}] {cfg['label']}, rank {args.rank}: {args.warmup} warm-up + {reps} steps per method, "
              "interleaved …", flush=True)
        wall, cpu, n = time_config(config, args.rank, reps, args.warmup, with_seal)
        rows.append(C.timing_row(f"step wall time, {cfg['label']}", wall["ours"], wall["peft"], GOAL,
                                 note=f"ours = plain LoRA; {n} modules"))
        rows.append(C.timing_row(f"step CPU time, {cfg['label']}", cpu["ours"], cpu["peft"], GOAL))
        if with_seal:
            rows.append(C.timing_row(f"SEAL step wall time vs PEFT, {cfg['label']}", wall["seal"], wall["peft"], None,
                                     note="information: SEAL (C/C_p alternating) vs PEFT"))
        extra["configs"][config] = dict(cfg, rank=args.rank, reps=reps, n_modules=n)
        gc.collect()

    if not args.no_memory:
        for config in configs:
            cfg = H.CONFIGS[config]
            steps = 3 if config == "tiny" else 1
            print(f"\n[{config}] peak memory: one fresh process per method, {1 + steps} steps each …", flush=True)
            res = {m: C.run_worker(__file__, ["--_worker", config, m, str(args.rank), str(steps)])
                   for m in ("peft", "lora")}
            o, b = res["lora"], res["peft"]
            rows.append(C.Row(f"peak RSS during steps, {cfg['label']}", o["peak_mib"], b["peak_mib"], "MiB",
                              f"≤ {GOAL:.2f}×", GOAL))
            rows.append(C.Row(f"RSS added by training steps, {cfg['label']}", o["delta_mib"], b["delta_mib"], "MiB",
                              f"≤ {GOAL:.2f}×", GOAL))
            extra["configs"].setdefault(config, {})["memory"] = res

    C.print_table("Our plain LoRA vs diffusers PEFT LoRA, training step (same UNet weights, rank, batch)", rows)
    C.write_json(args.json, "bench_vs_peft", info, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
