#!/usr/bin/env python
"""The function-level test (``verify --functional``): power against probes, and what it costs.

Power — −log10 p against the number of secret probes (the curve), for the release and any other suspects you pass
(distilled copies, innocents); both statistics (``ls``, the default, and the plain ``projection``). Without ``--key``
a small owner run is trained first (tiny default at its 64 px, rank 4, 60 steps, seed 0: the test fixture's settings, which train at 32 px).

Cost — on the tiny default: CPU seconds of building the owner's private cache (once per key and base), and of
``seal-diffusion verify --functional`` end to end in a fresh process with a warm cache (imports, key, base-model load,
weight test, suspect forward, p-value); goal ≤ 5 s on 2 cores. With ``--sd15``: the SD 1.5 architecture (random
weights, ~3.4 GB fp32): seconds per probe for the suspect's forward (what verify pays) and for the owner's cache
(2L + 1 = 257 forwards per probe), and the projected GPU time under a stated assumption.

    python benchmarks/bench_functional.py [--key K --lora L] [--suspect S ...] [--probes 1 2 4 8] [--sd15]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

GOAL_S = 5.0
# Assumption for the GPU projection: an SD 1.5 UNet forward at 64×64 latents, batch 1, fp16, takes ≈ 25 ms on an
# A100-class GPU (≈ 40 denoising steps/s without CFG); other sizes/batches scale with the CPU-measured FLOP ratio.
GPU_FORWARD_64_S = 0.025


def _train_owner(tmp: Path) -> tuple[str, str]:
    from seal_diffusion.models.subject import write_subject
    from seal_diffusion.training import parse_args, train

    data = write_subject(tmp / "subject")
    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(data),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(tmp / "owner"),
                       "--output_name", "cat", "--rank", "4", "--max_train_steps", "60", "--learning_rate", "2e-3",
                       "--seed", "0", "--cache_latents", "--secret", "bench"])
    res = train(args)
    res["network"].remove()
    return res["key_path"], res["lora_path"]


def curve(key_path: str, suspects: list[str], probes: list[int]) -> dict:
    import torch

    from seal_diffusion.detection import functional as F
    from seal_diffusion.detection import probe_cache as PC
    from seal_diffusion.detection import probes as P
    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.core.keyfile import SealKey

    key = SealKey.load(key_path)
    pipe = load_pipeline("tiny")
    t0 = time.process_time()
    # written beside the (copied) key: verify --functional with --probes max(probes) then finds it warm
    cache = PC.owner_cache(key, pipe, key_path=key_path, n_probes=max(probes))
    cache_cpu = time.process_time() - t0
    rows = {}
    ceiling = cache.n_modules * 0.30103
    print(f"\n−log10 p against probes (tiny default, {cache.n_modules} layers; ceiling {ceiling:.1f})")
    print(f"{'suspect':<40} {'stat':<11} " + " ".join(f"{n:>6}" for n in probes))
    for s in suspects:
        originals = P.merge_lora_into(pipe.unet, s)
        try:
            fs = P.suspect_outputs(pipe.unet, cache.probes)
        finally:
            P.restore_weights(pipe.unet, originals)
        for stat in F.STATISTICS:
            vals = [F.functional_test(cache, fs, statistic=stat, n_probes=n).neg_log10_p for n in probes]
            rows[f"{Path(s).name}:{stat}"] = vals
            print(f"{Path(s).name[:40]:<40} {stat:<11} " + " ".join(f"{v:6.1f}" for v in vals))
    del torch
    return {"curve": rows, "probes": probes, "cache_cpu_s": cache_cpu, "cache_probes": max(probes)}


def verify_cli_cost(key_path: str, lora: str, n: int) -> dict:
    """``verify --functional`` in a fresh process, twice, with the cache :func:`curve` left beside the key."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "seal_diffusion.cli", "verify", "--key", key_path, lora, "--base", "tiny",
           "--functional", "--probes", str(n)]
    out = {}
    for label in ("warm cache", "warm cache, again"):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        out[label] = {"wall_s": wall, "cpu_s": cpu, "rc": p.returncode}
        print(f"verify --functional ({label}, {n} probes): wall {wall:.2f} s, CPU {cpu:.2f} s, exit {p.returncode}")
    return out


def sd15_cost(batch: int = 2) -> dict:
    import torch

    from seal_diffusion.models.tiny import build_sd15_unet

    torch.manual_seed(0)
    unet = build_sd15_unet("cpu")
    unet.eval()
    res = {}
    for side in (64, 32):
        x = torch.randn(batch, 4, side, side)
        ehs = torch.randn(batch, 77, 768)
        t = torch.full((batch,), 500)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            unet(x[:1], t[:1], ehs[:1])
            c0, w0 = time.process_time(), time.time()
            unet(x, t, ehs)
            cpu, wall = time.process_time() - c0, time.time() - w0
        res[side] = {"cpu_s_per_sample": cpu / batch, "wall_s_per_sample": wall / batch}
        print(f"SD 1.5 forward at {side}×{side} latents (bf16 autocast): {wall / batch:.2f} s wall, "
              f"{cpu / batch:.2f} CPU s per sample")
    per = res[64]["cpu_s_per_sample"]  # the default probe: the model's own 64×64 latents (CPU s: robust to load)
    gpu = GPU_FORWARD_64_S
    n_layers = 128
    res.update(verify_s_per_probe=per, cache_s_per_probe=(2 * n_layers + 1) * per, gpu_forward_s=gpu,
               gpu_verify_s_per_probe=gpu, gpu_cache_s_per_probe=(2 * n_layers + 1) * gpu,
               half_size_ratio=res[32]["cpu_s_per_sample"] / per,
               gpu_assumption=f"SD 1.5 UNet forward at 64x64, batch 1, fp16 = {GPU_FORWARD_64_S * 1000:.0f} ms "
                              "(A100-class GPU); the owner's cache batches its 257 settings, which only helps")
    print(f"per probe, CPU seconds: verify {per:.2f} (suspect forward), owner cache {(2 * n_layers + 1) * per:.0f} "
          f"(257 forwards, once per key); the cache holds 128 × 4 × 64 × 64 fp32 = 8 MiB of directions per probe")
    print(f"projected GPU: verify {gpu * 1000:.0f} ms/probe, cache {(2 * n_layers + 1) * gpu:.1f} s/probe "
          f"({res['gpu_assumption']})")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key")
    ap.add_argument("--lora")
    ap.add_argument("--suspect", nargs="*", default=[], help="more suspects for the curve")
    ap.add_argument("--probes", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="probe counts of the curve (the largest is also the timed verify's --probes)")
    ap.add_argument("--sd15", action="store_true", help="also time the SD 1.5 architecture (random weights)")
    ap.add_argument("--json")
    args = ap.parse_args()
    info = C.machine_info()
    C.print_machine(info)
    with tempfile.TemporaryDirectory(prefix="bench-functional-") as tmp:
        key, lora = (args.key, args.lora) if args.key else _train_owner(Path(tmp))
        if args.key:  # the private cache lands beside the key: time against a copy, leave the owner's folder alone
            import shutil

            kd = Path(tmp) / "key"
            kd.mkdir()
            key = shutil.copy(args.key, kd / Path(args.key).name)
            readme = Path(args.key).with_name("README.md")
            if readme.is_file():
                shutil.copy(readme, kd / "README.md")
        extra = {"curve": curve(key, [lora, *args.suspect], sorted(set(args.probes)))}
        n = max(args.probes)
        extra["verify"] = verify_cli_cost(key, lora, n)
    warm = min(v["cpu_s"] for v in extra["verify"].values())
    rows = [C.Row(f"verify --functional, tiny, warm cache, {n} probes (CPU time)", warm, None, "s",
                  f"≤ {GOAL_S:g} s", GOAL_S, "ours", note="fresh process: imports + base load included")]
    if args.sd15:
        extra["sd15"] = sd15_cost()
    C.print_table("function-level test cost", rows)
    C.write_json(args.json, "bench_functional", info, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
