#!/usr/bin/env python
"""Verification speed on a real-size rank-32 LoRA, weights only: SD 1.5 (128 modules, goal ≤ 0.2 s) or, with
``--arch sdxl``, SDXL base (560 modules, goal ≤ 0.5 s).

The key is synthetic but full-size: module names and shapes from the real UNet built on the ``meta`` device (no
weights), random A, B and random passports C, C_p; the suspect is that key's exported public LoRA (kohya layout).
Timed separately, each the median of ``--reps`` runs (files are in the page cache, i.e. warm):

* key load — ``SealKey.load`` (safetensors read + checks + SHA-256 commitment), vs a bare safetensors read;
* suspect load — ``load_suspect`` (``read_lora`` + module mapping), vs a bare safetensors read;
* verify — ``verify(key, suspect)`` (pseudo-inverses, recovery, statistic, p-value), plus its parts as diagnostics
  (the sign-flip p-value both for the copy and for an unrelated LoRA, the DP's worst case);
* end to end — ``verify_path(key_path, lora_path)``, what ``seal-diffusion verify`` does after start-up.

Then ``scan`` of ``--files`` files (half exported copies in both layouts, half unrelated random LoRAs) against the key:
files/s as ``scan`` reports it (pseudo-inverses computed once), vs reading the same files with ``read_lora`` only.

    python benchmarks/bench_verify.py [--arch sd15|sdxl] [--reps 7] [--files 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C

GOALS_S = {"sd15": 0.2, "sdxl": 0.5}
ARCH_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def synthetic_key(rank: int, seed: int = 0, arch: str = "sd15"):
    import torch

    from seal_diffusion.core.keyfile import ModuleKey, SealKey
    from seal_diffusion.core.network import find_target_modules
    from seal_diffusion.core.passport import make_passports
    from seal_diffusion.models.tiny import build_sd15_unet, build_sdxl_unet

    modules = find_target_modules((build_sdxl_unet if arch == "sdxl" else build_sd15_unet)("meta"))
    passports = make_passports(list(modules), rank, b"bench-verify")
    g = torch.Generator().manual_seed(seed)
    keymods = {}
    for name, lin in modules.items():
        a = torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5
        b = torch.randn(lin.out_features, rank, generator=g) * 0.01
        keymods[name] = ModuleKey(a, b, *passports[name])
    return SealKey(keymods, rank, float(rank), base_model=f"{arch}-architecture (random)",
                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]), modules


def random_lora(modules, rank: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, lin.in_features, generator=g) * 0.05,
                torch.randn(lin.out_features, rank, generator=g) * 0.01) for n, lin in modules.items()}


def timeit(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", choices=sorted(GOALS_S), help="UNet architecture (default sd15)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--files", type=int, default=20, help="files for the scan benchmark")
    p.add_argument("--json", metavar="OUT", help="write results as JSON")
    args = p.parse_args(argv)

    from safetensors.torch import load_file

    from seal_diffusion.core.export import export_lora
    from seal_diffusion.core.keyfile import SealKey
    from seal_diffusion.formats.lora_file import read_lora, write_lora
    from seal_diffusion.detection.scan import scan
    from seal_diffusion.detection.verify import (Suspect, _recover, load_suspect, prepare, sign_flip_neg_log10_p, verify,
                                       verify_path)

    GOAL_S, arch = GOALS_S[args.arch], ARCH_NAMES[args.arch]
    info = C.machine_info()
    C.print_machine(info)
    print(f"\nbuilding a synthetic {arch} rank-{args.rank} key and its export …", flush=True)
    key, modules = synthetic_key(args.rank, arch=args.arch)
    rows: list[C.Row] = []
    with tempfile.TemporaryDirectory(prefix="seal-bench-verify-") as tmp:
        tmp = Path(tmp)
        key_path = key.save(tmp / "owner.sealkey")
        lora_path = export_lora(key, tmp / "release.safetensors", "kohya")
        mib = lambda p: p.stat().st_size / 2**20  # noqa: E731
        print(f"  {len(key.modules)} modules; key file {mib(key_path):.1f} MiB, LoRA file {mib(lora_path):.1f} MiB")

        t_key = timeit(lambda: SealKey.load(key_path), args.reps)
        t_key_raw = timeit(lambda: load_file(str(key_path)), args.reps)
        t_sus = timeit(lambda: load_suspect(lora_path, key), args.reps)
        t_sus_raw = timeit(lambda: load_file(str(lora_path)), args.reps)
        suspect = load_suspect(lora_path, key)
        report = verify(key, suspect)
        t_ver = timeit(lambda: verify(key, suspect), args.reps)
        t_e2e = timeit(lambda: verify_path(key_path, lora_path), args.reps)
        # parts of verify (diagnostics)
        prepared = prepare(key).ready()
        t_prep = timeit(lambda: prepare(key).ready(), args.reps)
        t_rec = timeit(lambda: _recover(prepared, suspect), args.reps)
        zs = [m.stat for m in report.per_module]
        t_sf = timeit(lambda: sign_flip_neg_log10_p(zs), args.reps)
        other = verify(prepared, Suspect("unrelated", "kohya", factors=random_lora(modules, args.rank, 99)))
        zs_other = [m.stat for m in other.per_module]
        t_sf_other = timeit(lambda: sign_flip_neg_log10_p(zs_other), args.reps)
        t_ver_prep = timeit(lambda: verify(prepared, suspect), args.reps)
        med = statistics.median
        print(f"  verdict on the export: detected={report.detected}, −log10 p = {report.neg_log10_p:.1f}, "
              f"reconstruction error {report.reconstruction_error:.2e}")

        rows += [
            C.Row("key load (SealKey.load: read + checks + commitment)", med(t_key), med(t_key_raw), "s",
                  "—", None, "none", note="baseline: bare safetensors read of the key"),
            C.Row("suspect load (load_suspect, kohya file)", med(t_sus), med(t_sus_raw), "s", "—", None, "none",
                  note="baseline: bare safetensors read of the LoRA"),
            C.Row("verify(key, suspect), weights only", med(t_ver), None, "s", f"≤ {GOAL_S} s", GOAL_S, "ours",
                  note=f"{report.n_modules} modules"),
            C.Row("end to end: verify_path(key file, LoRA file)", med(t_e2e), None, "s", f"≤ {GOAL_S} s", GOAL_S,
                  "ours", note="key load + suspect load + verify"),
            C.Row("  part: key algebra (prepare(key).ready(): Gram matrices, r×r pinvs)", med(t_prep), None, "s",
                  "(diagnostic)", None, "none", note="a one-off verify gets the Gram matrices inside the recovery"),
            C.Row("  part: recover Ĉ + reconstruction error (key prepared)", med(t_rec), None, "s", "(diagnostic)",
                  None, "none"),
            C.Row("  part: sign-flip p-value (exact DP), the copy", med(t_sf), None, "s", "(diagnostic)", None,
                  "none"),
            C.Row("  part: sign-flip p-value (exact DP), an unrelated LoRA", med(t_sf_other), None, "s",
                  "(diagnostic)", None, "none", note=f"−log10 p = {other.neg_log10_p:.2f}"),
            C.Row("  verify with the key prepared (as scan does)", med(t_ver_prep), None, "s", "(diagnostic)",
                  None, "none"),
        ]

        # -- scan -------------------------------------------------------------------------------------------------
        files_dir = tmp / "market"
        files_dir.mkdir()
        n_copies = args.files // 2
        for i in range(n_copies):
            layout = "kohya" if i % 2 == 0 else "diffusers"
            export_lora(key, files_dir / f"copy_{i:02d}_{layout}.safetensors", layout)
        for i in range(args.files - n_copies):
            write_lora(random_lora(modules, args.rank, 100 + i), files_dir / f"other_{i:02d}.safetensors",
                       "kohya" if i % 2 == 0 else "diffusers")
        files = sorted(files_dir.glob("*.safetensors"))
        scan([key_path], files)  # warm-up (page cache, lazy imports)
        rates, walls = [], []
        for _ in range(max(1, args.reps // 2)):
            t0 = time.perf_counter()
            scan_rows, rate = scan([key_path], files)
            walls.append(time.perf_counter() - t0)
            rates.append(rate)
        read_rates = []
        for _ in range(max(1, args.reps // 2)):
            t0 = time.perf_counter()
            for f in files:
                read_lora(f)
            read_rates.append(len(files) / (time.perf_counter() - t0))
        hits = sum(bool(r.detected) for r in scan_rows)
        correct = sum(bool(r.detected) == Path(r.file).name.startswith("copy_") for r in scan_rows)
        rows += [
            C.Row(f"scan: files/s over {len(files)} files (1 key)", med(rates), med(read_rates), "files/s",
                  f"≥ {1 / GOAL_S:.0f} files/s", 1 / GOAL_S, "ours_min",
                  note=f"baseline: read_lora only; {hits} detected, {correct}/{len(files)} verdicts right"),
            C.Row(f"scan: whole call incl. key load, {len(files)} files", med(walls), None, "s", "—", None, "none"),
        ]

    C.print_table(f"Verification, {arch} shapes, rank {args.rank}, {len(key.modules)} modules (weights only)", rows)
    C.write_json(args.json, "bench_verify", info, rows, {"verdict": report.to_json() | {"per_module": "omitted"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
