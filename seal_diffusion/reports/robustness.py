"""The attack matrix (``seal-diffusion robustness``): one report of how the watermark survives what a thief can do.

:func:`run_robustness` loads the base model **once** and measures, against the owner's key:

1. **Pruning** (paper Fig. 3): magnitude pruning of the factors and of ΔW at growing ratios → −log10 p, and fidelity:
   the held-out denoising loss on the subject with the attacked LoRA (:func:`lora_heldout_loss`), reported as the
   share of the release's improvement over the base that is retained, ``(L_base − L_attacked) / (L_base − L_release)``.
2. **Fine-tuning**: continued plain-LoRA training from the release (:func:`seal_diffusion.attacks.finetune.finetune_lora`) for
   growing step counts → −log10 p, per-module evidence and per-module relative change ‖ΔW_ft − ΔW‖/‖ΔW‖ (computed from
   the factors, ΔW never formed), and two **weighted** pooled statistics that lean on the quiet layers (below).
3. **Ambiguity** (paper Fig. 4): forged second passports ``(1−γ)·C_p + γ·R`` for γ ∈ [0, 1] → the claim check's
   fidelity gap, SSIM of C vs C_p images and its verdict; random, identity and optimised forgeries must be rejected.
4. **Obfuscations** (rescale, permute, mix, pad-rank, refactor-svd: −log10 p must not move), quantisation (fp16, bf16,
   int8), noise at several levels, merging with an innocent LoRA, and merging into a checkpoint (verified against
   the base).
5. **Innocents** (≥ 200): decoy keys (the key's B, A with fresh passports, tested on the release), random LoRAs of the
   release's shapes, and in the full run a few plain LoRAs trained on the same subject from the same base. The
   detected fraction is reported with a one-sided 95 % Clopper–Pearson upper bound.

What each measurement is (factor algebra, the exactly-valid weighted statistics, fidelity, the claim bench, the
innocents) is in :mod:`seal_diffusion.reports.robustness_measures`; the Markdown, JSON and plots in
:mod:`seal_diffusion.reports.robustness_report`.

``quick=True`` is the test-sized matrix (two pruning ratios, one short fine-tune, γ ∈ {0, 1}, 200 cheap innocents).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..defaults import FUNCTIONAL_PROBES
from ..attacks import file_attacks as attacks
from ..models.base_model import load_pipeline
from ..ownership.claim import check_claim, forge_passport_p
from ..attacks.distill import distill_lora, fidelity_of
from ..errors import UserError
from ..attacks.finetune import finetune_lora
from ..detection.functional import combined_neg_log10_p, functional_test
from ..core.keyfile import SealKey
from ..formats.lora_file import LoraFile, read_lora
from ..detection.probe_cache import owner_cache
from ..detection.probes import merge_lora_into, restore_weights, suspect_outputs
from ..progress import Progress, Ticker
from .robustness_measures import (_ClaimBench, _Fidelity, _innocents, _KeyGeometry, _random_lora, delta_norms,
                                  relative_change, weighted_neg_log10_p)
from .robustness_report import write_report
from ..models.subject import write_subject
from ..training import parse_args, train
from ..detection.verify import DEFAULT_THRESHOLD, Suspect, load_suspect, prepare, verify

OBFUSCATIONS = [("rescale", dict(factor=7.0)), ("permute", dict(seed=1)), ("mix", dict(seed=2)),
                ("pad-rank", dict(extra=4, seed=3)), ("refactor-svd", {})]
FORGERY_MODES = ("random", "identity", "optimised")


@dataclass
class Plan:
    """What is measured; :func:`plan_for` gives the quick (test) and the full plan."""

    prune_ratios: tuple[float, ...]
    finetune_steps: tuple[int, ...]
    finetune_lrs: tuple[float, ...]
    gammas: tuple[float, ...]
    noise_stds: tuple[float, ...]
    n_decoys: int
    n_random: int
    n_trained_innocents: int
    innocent_steps: int
    optimise_steps: int
    claim_seeds: tuple[int, ...]
    loss_timesteps: int
    attack_fidelity: bool  # fidelity for every damaging attack (else pruning and fine-tuning only)
    distill: tuple[tuple[int, int], ...] = ()  # (student rank, steps) of each distillation row
    functional_probes: int = FUNCTIONAL_PROBES  # the CLI's default
    functional_size: int | None = None  # probe latent side (default: half the model's, as the CLI)


def plan_for(quick: bool, *, finetune_lrs: Sequence[float] | None = None, finetune_steps: Sequence[int] | None = None,
             trained_innocents: int | None = None, distill: Sequence[tuple[int, int]] | None = None) -> Plan:
    if quick:
        plan = Plan(prune_ratios=(0.9, 0.99), finetune_steps=(0, 8), finetune_lrs=(5e-5,), gammas=(0.0, 1.0),
                    noise_stds=(0.3, 1.0), n_decoys=100, n_random=100, n_trained_innocents=0, innocent_steps=60,
                    optimise_steps=3, claim_seeds=(0, 1), loss_timesteps=4, attack_fidelity=False)
    else:
        plan = Plan(prune_ratios=(0.5, 0.8, 0.9, 0.95, 0.99, 0.999), finetune_steps=(0, 25, 50, 100),
                    finetune_lrs=(5e-5,), gammas=tuple(round(0.1 * i, 1) for i in range(11)),
                    noise_stds=(0.1, 0.3, 1.0, 3.0), n_decoys=200, n_random=200, n_trained_innocents=2,
                    innocent_steps=60, optimise_steps=50, claim_seeds=(0, 1, 2, 3), loss_timesteps=8,
                    attack_fidelity=True, distill=((4, 100), (4, 400)))
    if finetune_lrs:
        plan.finetune_lrs = tuple(float(x) for x in finetune_lrs)
    if finetune_steps:
        plan.finetune_steps = tuple(sorted({0, *(int(s) for s in finetune_steps)}))
    if trained_innocents is not None:
        plan.n_trained_innocents = int(trained_innocents)
    if distill is not None:
        plan.distill = tuple((int(r), int(n)) for r, n in distill)
    return plan


def _plan_units(plan: Plan) -> int:
    n = 2 + 2 * len(plan.prune_ratios) + len(OBFUSCATIONS) + 3 + len(plan.noise_stds) + 2 + plan.n_trained_innocents + 1
    n += sum(len(plan.finetune_steps) + sum(plan.finetune_steps) for _ in plan.finetune_lrs)
    n += 1 + len(plan.gammas) + len(FORGERY_MODES) + 1
    n += plan.n_trained_innocents * plan.innocent_steps + plan.n_decoys + plan.n_random + 1
    n += sum(steps + 1 for _, steps in plan.distill) + (1 if plan.distill else 0)
    return n


# -- the run ------------------------------------------------------------------------------------------------------------
def run_robustness(key, lora, base="tiny", data=None, out_dir="robustness", *, quick: bool = False,
                   progress: Progress | None = None, prompt: str = "a photo of sks cat", config=None,
                   threshold: float = DEFAULT_THRESHOLD, seed: int = 0, finetune_lrs: Sequence[float] | None = None,
                   finetune_steps: Sequence[int] | None = None, trained_innocents: int | None = None,
                   distill: Sequence[tuple[int, int]] | None = None) -> dict:
    """Run the attack matrix on the released ``lora`` with the owner's ``key``; write report.md, report.json and
    plots to ``out_dir``. Returns the report (the content of report.json) with ``files`` added.

    ``progress(done, total, label)`` is called as the work advances (the CLI draws a tqdm bar with it).
    """
    t0 = time.time()
    key_label = "(in memory)" if isinstance(key, SealKey) else str(key)
    key = key if isinstance(key, SealKey) else SealKey.load(key)
    lora_path = Path(lora)
    release = read_lora(lora_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_for(quick, finetune_lrs=finetune_lrs, finetune_steps=finetune_steps,
                    trained_innocents=trained_innocents, distill=distill)
    tick = Ticker(_plan_units(plan), progress)
    modules = list(key.modules)
    prepared = prepare(key)  # key-side algebra once for the whole report
    geometry = _KeyGeometry(key)

    def suspect_of(lf: LoraFile, name: str) -> Suspect:
        return Suspect(name, lf.layout, factors=lf.by_module(modules))

    def check(lf: LoraFile, name: str, fid: bool = True) -> dict:
        s = suspect_of(lf, name)
        rep = verify(prepared, s, threshold)
        row = {"neg_log10_p": rep.neg_log10_p, "detected": rep.detected, "reconstruction_error":
               rep.reconstruction_error, "n_modules": rep.n_modules}
        meas = geometry.measures(s.factors)
        row["weighted_pair"] = weighted_neg_log10_p(rep, meas, "pair")
        row["weighted_subspace"] = weighted_neg_log10_p(rep, meas, "subspace")
        if fid:
            row.update(fidelity.measure(s.factors))
        return row, rep, s

    with tempfile.TemporaryDirectory(prefix="seal-robustness-") as tmp:
        tmp = Path(tmp)
        if data is None:
            data = write_subject(tmp / "subject")
        if not Path(data).is_dir():
            raise UserError(f"--data {data}: not a folder of subject images")
        pipe = load_pipeline(base, config=config)
        fidelity = _Fidelity(pipe, key, data, prompt, plan.loss_timesteps)
        tick("base model")
        base_row, base_rep, base_suspect = check(release, str(lora_path), fid=False)
        fidelity.release = fidelity.loss(base_suspect.factors)
        base_row.update(loss=fidelity.release, retained=1.0)
        if not base_rep.detected:
            warnings.warn(f"{lora_path}: the unattacked release is not detected with this key "
                          f"(−log10 p = {base_rep.neg_log10_p:.2f}); wrong key?")
        tick("release")
        rows: list[dict] = [dict(group="release", attack="none (the release)", **base_row)]

        # 1. pruning
        pruning = [dict(on=on, ratio=0.0, **{k: base_row[k] for k in ("neg_log10_p", "detected", "loss", "retained",
                                                                        "weighted_pair", "weighted_subspace")})
                   for on in ("factors", "delta")]
        for on in ("factors", "delta"):
            for ratio in plan.prune_ratios:
                row, _, _ = check(attacks.prune(release, ratio, on), f"prune {on} {ratio}")
                pruning.append(dict(on=on, ratio=ratio, **row))
                rows.append(dict(group="prune", attack=f"prune {on} {ratio:g}", **row))
                tick(f"prune {on} {ratio:g}")

        # 4. obfuscations, quantisation, noise, merges
        for name, kw in OBFUSCATIONS:
            row, _, _ = check(attacks.FILE_ATTACKS[name](release, **kw), name, fid=False)
            ref = base_row["neg_log10_p"]
            row["unchanged"] = abs(row["neg_log10_p"] - ref) <= 1e-6 * max(ref, 1e-12)
            rows.append(dict(group="obfuscation", attack=name, **row))
            tick(name)
        for dtype in ("fp16", "bf16", "int8"):
            row, _, _ = check(attacks.quantize(release, dtype), f"quantize {dtype}", fid=plan.attack_fidelity)
            rows.append(dict(group="quantize", attack=f"quantize {dtype}", **row))
            tick(f"quantize {dtype}")
        for std in plan.noise_stds:
            row, _, _ = check(attacks.noise(release, std, seed=seed), f"noise {std}", fid=plan.attack_fidelity)
            rows.append(dict(group="noise", attack=f"noise {std:g}×RMS", **row))
            tick(f"noise {std:g}")
        gen = torch.Generator().manual_seed(seed + 1000)
        innocent_same_norm = _random_lora(release, gen, delta_norms(base_suspect.factors))
        merges = [("random LoRA, same norm", innocent_same_norm)]
        for label, other in merges:
            for rank in (None, key.rank):
                merged = attacks.merge_lora(release, other, weight=1.0, rank=rank)
                what = f"merge-lora (+{label}{f', SVD to rank {rank}' if rank else ''})"
                row, _, _ = check(merged, what, fid=plan.attack_fidelity)
                rows.append(dict(group="merge", attack=what, **row))
                tick(what)
        merged_dir = attacks.merge_into_checkpoint(lora_path, base, tmp / "merged", config=config)
        ck = load_suspect(merged_dir, key, base, config=config)
        rep = verify(prepared, ck, threshold)
        rows.append(dict(group="merge", attack="merge-checkpoint (diffusers folder, verified with --base)",
                         neg_log10_p=rep.neg_log10_p, detected=rep.detected,
                         reconstruction_error=rep.reconstruction_error, n_modules=rep.n_modules))
        tick("merge-checkpoint")

        # 5a. same-subject plain LoRAs (full run): innocents, and partners for merge-lora
        trained = _train_innocents(plan, base, data, prompt, config, key.rank, seed, tmp, tick)
        for i, path in enumerate(trained):
            other = read_lora(path)
            what = f"merge-lora (+same-subject plain LoRA #{i + 1})"
            row, _, _ = check(attacks.merge_lora(release, other), what, fid=plan.attack_fidelity)
            rows.append(dict(group="merge", attack=what, **row))
            tick(what)

        # 2. fine-tuning
        finetune = []
        for lr in plan.finetune_lrs:
            points = []
            for steps in plan.finetune_steps:
                if steps == 0:
                    tuned = release
                else:
                    done0 = tick.done
                    path = _finetune(lora_path, tmp / f"ft-{lr:g}-{steps}.safetensors", data, base, steps, lr, seed,
                                     config, prompt, lambda s, n, *_: tick.advance_to(
                                         done0 + s, f"fine-tune lr {lr:g}: step {s}/{n}"))
                    tuned = read_lora(path)
                row, rep, s = check(tuned, f"finetune {steps} lr {lr:g}")
                change = relative_change(s.factors, base_suspect.factors)
                meas = geometry.measures(s.factors)
                row["per_module"] = [dict(module=m.module, stat=m.stat, neg_log10_p=m.neg_log10_p,
                                          rel_change=change.get(m.module), pair=meas[m.module]["pair"],
                                          subspace=meas[m.module]["subspace"]) for m in rep.per_module]
                row["median_rel_change"] = float(np.median(list(change.values()))) if change else 0.0
                points.append(dict(steps=steps, **row))
                if steps:
                    rows.append(dict(group="finetune", attack=f"fine-tune {steps} steps, lr {lr:g}",
                                     **{k: v for k, v in row.items() if k != "per_module"}))
                tick(f"fine-tune lr {lr:g}, {steps} steps: verify")
            finetune.append(dict(lr=lr, points=points))

        # 3. ambiguity: γ curve and forgeries
        bench = _ClaimBench(pipe, key, base_suspect, fidelity.latents, fidelity.ehs, prompt, plan.claim_seeds,
                            plan.loss_timesteps)
        tick("claim check: reference images")
        try:
            gamma_rows = []
            for g in plan.gammas:
                res = bench.evaluate(forge_passport_p(key, "gamma", g, seed=seed))
                gamma_rows.append(dict(gamma=g, **res))
                tick(f"claim γ={g:g}")
            forgeries = []
            for mode in FORGERY_MODES:
                forged = forge_passport_p(key, mode, 0.0, seed=seed, base=base, data=data, prompt=prompt,
                                          steps=plan.optimise_steps)
                forgeries.append(dict(mode=mode, **bench.evaluate(forged)))
                tick(f"forgery {mode}")
        finally:
            bench.close()
        claim_reference = {"loss_C": bench.loss_c, "loss_off": bench.loss_off, "R1": bench.r1[0],
                           "reconstruction_error": bench.r1[1]}
        library_check = None
        if not quick:
            rep_claim = check_claim(key, lora_path, base=pipe, data=data, prompt=prompt)
            library_check = {"accepted": rep_claim.accepted, "loss_gap": rep_claim.measurements.get("loss_gap"),
                             "ssim_C_Cp": rep_claim.measurements.get("ssim_C_Cp")}
        tick("claim check (library)")

        # 5b. innocents
        innocents = _innocents(key, release, base_suspect, trained, plan, threshold, seed, prepared, geometry, tick)

        # 6. distillation: a fresh LoRA trained on the release's outputs; both tests per row
        distillation = _distillation(plan, key, lora_path, pipe, base, config, threshold, seed, tmp, tick,
                                     base_row, trained, check)
        rows += [dict(group="distill", attack=d["attack"], neg_log10_p=d["neg_log10_p"], detected=d["detected"],
                      functional_neg_log10_p=d["functional_neg_log10_p"], fidelity_kept=d["fidelity_kept"])
                 for d in distillation["rows"] if d["attack"].startswith("distill")]

    report = {
        "meta": {"key": key_label, "lora": str(lora_path), "base": str(base), "data": str(data),
                 "prompt": prompt, "quick": quick, "threshold": threshold, "statistic": "contrast",
                 "n_modules": len(modules), "rank": key.rank, "layout": release.layout, "seed": seed,
                 "plan": asdict(plan), "base_loss": fidelity.base, "release_loss": fidelity.release},
        "release": base_row,
        "attacks": rows,
        "pruning": pruning,
        "finetune": finetune,
        "gamma": gamma_rows,
        "gamma_threshold": _gamma_threshold(gamma_rows),
        "gamma_threshold_fidelity": _gamma_threshold(gamma_rows, "R2 fidelity"),
        "forgeries": forgeries,
        "claim_reference": claim_reference,
        "claim_library_check": library_check,
        "innocents": innocents,
        "distillation": distillation,
    }
    report["seconds"] = time.time() - t0
    files = write_report(report, out_dir)
    tick("report written")
    report["files"] = {k: str(v) for k, v in files.items()}
    return report


def _distillation(plan, key, lora_path, pipe, base, config, threshold, seed, tmp: Path, tick, base_row, trained,
                  check) -> dict:
    """Rows for the release, each distilled copy and the trained innocents: fidelity kept, weight test, function
    test (its probes computed once, not cached on disk) and the Bonferroni-combined verdict."""
    if not plan.distill:
        return {"rows": [], "n_probes": 0}
    cache = owner_cache(key, pipe, n_probes=plan.functional_probes, use_cache=False, size=plan.functional_size)
    tick("function test: owner probes")

    def func(path) -> float:
        originals = merge_lora_into(pipe.unet, path)
        try:
            return functional_test(cache, suspect_outputs(pipe.unet, cache.probes), threshold).neg_log10_p
        finally:
            restore_weights(pipe.unet, originals)

    def row(attack, path, weight_nlp, fid):
        f = func(path)
        comb = combined_neg_log10_p(weight_nlp, f)
        return dict(attack=attack, fidelity_kept=fid, neg_log10_p=weight_nlp, detected=weight_nlp >= threshold,
                    functional_neg_log10_p=f, functional_detected=f >= threshold, combined_neg_log10_p=comb,
                    combined_detected=comb >= threshold)

    rows = [row("none (the release)", lora_path, base_row["neg_log10_p"], 1.0)]
    for rank, steps in plan.distill:
        done0 = tick.done
        res = distill_lora(lora_path, tmp / f"distill-r{rank}-{steps}.safetensors", base=base, rank=rank,
                           steps=steps, seed=seed, config=config, overwrite=True, fidelity_inputs=16,
                           progress=lambda s, n: tick.advance_to(done0 + s, f"distill rank {rank}: step {s}/{n}"))
        w, _, _ = check(read_lora(res.path), f"distill r{rank} {steps}", fid=False)
        rows.append(row(f"distill rank {rank}, {steps} steps", res.path, w["neg_log10_p"], res.fidelity))
        tick(f"distill rank {rank}, {steps} steps: verify")
    for i, path in enumerate(trained):
        w, _, _ = check(read_lora(path), f"innocent {i}", fid=False)
        rows.append(row(f"innocent: same-subject plain LoRA #{i + 1}", path, w["neg_log10_p"],
                        fidelity_of(path, lora_path, pipe=pipe)))
    return {"rows": rows, "n_probes": plan.functional_probes}



def _finetune(lora_path, out, data, base, steps, lr, seed, config, prompt, callback) -> Path:
    return finetune_lora(lora_path, out, data=data, base=base, steps=steps, learning_rate=lr, seed=seed,
                         overwrite=True, config=config, instance_prompt=prompt, progress_callback=callback)


def _train_innocents(plan: Plan, base, data, prompt, config, rank, seed, tmp: Path, tick) -> list[Path]:
    paths = []
    lr = max(plan.finetune_lrs)
    for i in range(plan.n_trained_innocents):
        out = tmp / f"innocent-{i}"
        argv = ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data), "--instance_prompt",
                prompt, "--output_dir", str(out), "--output_name", "innocent", "--method", "lora", "--rank", str(rank),
                "--max_train_steps", str(plan.innocent_steps), "--learning_rate", str(lr), "--seed",
                str(seed + 101 + i), "--cache_latents"]
        if config:
            argv += ["--config", str(config)]
        done0 = tick.done
        result = train(parse_args(argv),
                       lambda s, n, *_: tick.advance_to(done0 + s, f"innocent LoRA #{i + 1}: step {s}/{n}"))
        result["network"].remove()
        paths.append(Path(result["lora_path"]))
    return paths



def _gamma_threshold(rows: list[dict], check: str | None = None) -> float | None:
    """The smallest γ from which on every forged claim fails (``check``: that check alone); None if γ = 1 passes."""
    thr = None
    for r in sorted(rows, key=lambda r: -r["gamma"]):
        if (r["checks"][check] if check else r["accepted"]):
            break
        thr = r["gamma"]
    return thr

