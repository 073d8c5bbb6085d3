"""The attack matrix (``seal-diffusion robustness``): one report of how the watermark survives what a thief can do.

:func:`run_robustness` loads the base model **once** and measures, against the owner's key:

1. **Pruning** (paper Fig. 3): magnitude pruning of the factors and of ΔW at growing ratios → −log10 p, and fidelity:
   the held-out denoising loss on the subject with the attacked LoRA (:func:`lora_heldout_loss`), reported as the
   share of the release's improvement over the base that is retained, ``(L_base − L_attacked) / (L_base − L_release)``.
2. **Fine-tuning**: continued plain-LoRA training from the release (:func:`seal_diffusion.finetune.finetune_lora`) for
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

**Weighted pooling stays exact.** The default test is the sign-flip test on d_m = ⟨Ĉ_m, C_m − C_p,m⟩/(σ√2‖Ĉ_m‖)
(:mod:`seal_diffusion.verify`). Under H0 the release coin makes the labels (C, C_p) of each module a fair coin given
everything else, and swapping them flips the sign of d_m. So for **any** weights w_m ≥ 0 that are functions of the
suspect, B, A and the *unordered* pair {C_m, C_p,m} (hence unchanged by a swap), Σ w_m d_m has exactly the law of
Σ ε_m w_m |d_m| and :func:`~seal_diffusion.verify.sign_flip_neg_log10_p` on (w_m d_m) is an exact p-value. Weights built
from the *released* C alone (e.g. the true relative change ‖ΔŴ − s·B·C·A‖/‖s·B·C·A‖) are not symmetric and would
break exactness. The two symmetric weights measured here:

* ``pair``: w_m = 1/(ε + min_t ‖ΔŴ_m − s·B·C_t·A‖/‖s·B·C_t·A‖) over t ∈ {C, C_p} (min is symmetric; for a
  fine-tuned copy it is the relative change from the release);
* ``subspace``: w_m = 1/(ε + ρ_m), ρ_m = ‖ΔŴ_m − P_B ΔŴ_m P_A‖/‖ΔŴ_m‖, the share of the suspect's update outside
  the owner's column/row spaces (suspect, B, A only).

``quick=True`` is the test-sized matrix (two pruning ratios, one short fine-tune, γ ∈ {0, 1}, 200 cheap innocents).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import UserError
from .keyfile import ModuleKey, SealKey
from .lora_file import LoraFile, read_lora
from .verify import DEFAULT_THRESHOLD, Suspect, prepare, sign_flip_neg_log10_p, verify

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (down r×in, up out×r)}, ΔW = up @ down
Progress = Callable[[int, int, str], object]  # (units done, units total, what is running)

WEIGHT_EPS = 0.05
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
    functional_probes: int = 8
    functional_size: int | None = None  # probe latent side (default: the model's)


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


class _Ticker:
    def __init__(self, total: int, callback: Progress | None):
        self.total, self.done, self.callback = total, 0, callback

    def __call__(self, label: str, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self.callback is not None:
            self.callback(self.done, self.total, label)


def _plan_units(plan: Plan) -> int:
    n = 2 + 2 * len(plan.prune_ratios) + len(OBFUSCATIONS) + 3 + len(plan.noise_stds) + 2 + plan.n_trained_innocents + 1
    n += sum(len(plan.finetune_steps) + sum(plan.finetune_steps) for _ in plan.finetune_lrs)
    n += 1 + len(plan.gammas) + len(FORGERY_MODES) + 1
    n += plan.n_trained_innocents * plan.innocent_steps + plan.n_decoys + plan.n_random + 1
    n += sum(steps + 1 for _, steps in plan.distill) + (1 if plan.distill else 0)
    return n


# -- factor algebra (ΔW never formed) ---------------------------------------------------------------------------------
def _gram_dist2(u1, d1, u2, d2) -> tuple[float, float, float]:
    """(‖U1D1‖², ‖U2D2‖², ⟨U1D1, U2D2⟩) from r×r products."""
    u1, d1, u2, d2 = (t.double() for t in (u1, d1, u2, d2))
    n1 = float(torch.trace((u1.T @ u1) @ (d1 @ d1.T)))
    n2 = float(torch.trace((u2.T @ u2) @ (d2 @ d2.T)))
    cross = float(torch.trace((u1.T @ u2) @ (d2 @ d1.T)))
    return n1, n2, cross


def relative_change(new: Factors, old: Factors) -> dict[str, float]:
    """‖ΔW_new − ΔW_old‖ / ‖ΔW_old‖ per module held by both (from the factors)."""
    out = {}
    for m, (d0, u0) in old.items():
        if m in new:
            d1, u1 = new[m]
            n1, n0, cross = _gram_dist2(u1, d1, u0, d0)
            out[m] = math.sqrt(max(n1 - 2 * cross + n0, 0.0) / n0) if n0 > 0 else float("inf")
    return out


def delta_norms(factors: Factors) -> dict[str, float]:
    return {m: math.sqrt(max(_gram_dist2(u, d, u, d)[0], 0.0)) for m, (d, u) in factors.items()}


class _KeyGeometry:
    """Per-module orthonormal bases of B's columns and A's rows, s·B, and C_t·A: for the symmetric weights."""

    def __init__(self, key: SealKey):
        self.key = key
        self.mods = {}
        for m, mk in key.modules.items():
            b, a = mk.lora_B.double(), mk.lora_A.double()
            self.mods[m] = dict(qb=torch.linalg.qr(b)[0], qa=torch.linalg.qr(a.T)[0], sb=b * key.scale,
                                ca=mk.passport.double() @ a, cpa=mk.passport_p.double() @ a)

    def with_passports(self, key: SealKey) -> "_KeyGeometry":
        """The same B, A with another key's passports (decoys) without redoing the QRs."""
        g = object.__new__(_KeyGeometry)
        g.key = key
        g.mods = {m: dict(v, ca=key.modules[m].passport.double() @ self.key.modules[m].lora_A.double(),
                          cpa=key.modules[m].passport_p.double() @ self.key.modules[m].lora_A.double())
                  for m, v in self.mods.items()}
        return g

    def measures(self, factors: Factors) -> dict[str, dict[str, float]]:
        """Per module: ``pair`` = min_t ‖ΔŴ − s·B·C_t·A‖/‖s·B·C_t·A‖ and ``subspace`` = ρ (module docstring)."""
        out = {}
        for m, g in self.mods.items():
            if m not in factors:
                continue
            d, u = (t.double() for t in factors[m])
            rels = []
            for y in (g["ca"], g["cpa"]):
                n_s, n_k, cross = _gram_dist2(u, d, g["sb"], y)
                rels.append(math.sqrt(max(n_s - 2 * cross + n_k, 0.0) / n_k) if n_k > 0 else float("inf"))
            total = _gram_dist2(u, d, u, d)[0]
            inside = float(((g["qb"].T @ u) @ (d @ g["qa"])).pow(2).sum())
            rho = math.sqrt(max(1.0 - inside / total, 0.0)) if total > 0 else 1.0
            out[m] = {"pair": min(rels), "subspace": rho}
        return out


def weighted_neg_log10_p(report, measures: dict[str, dict[str, float]], which: str, eps: float = WEIGHT_EPS) -> float:
    """Exact sign-flip −log10 p of Σ w_m d_m with w_m = 1/(eps + measure); the measure must be swap-symmetric."""
    wd = [m.stat / (eps + measures[m.module][which]) for m in report.per_module if m.module in measures]
    return sign_flip_neg_log10_p(wd)


# -- fidelity ---------------------------------------------------------------------------------------------------------
def lora_heldout_loss(pipe, factors: Factors, latents, encoder_hidden_states, *, targets=None,
                      n_timesteps: int = 8) -> float:
    """Held-out denoising loss of ``pipe`` with a LoRA's factors (scale folded into up) loaded as a plain LoRA.

    Modules of lower rank are zero-padded to the largest rank; modules the file lacks contribute nothing. The UNet
    is left exactly as it was.
    """
    from .network import DEFAULT_TARGETS, SealNetwork
    from .evaluation import heldout_denoising_loss

    rank = max(d.shape[0] for d, _ in factors.values())
    net = SealNetwork(pipe.unet, rank, alpha=rank, passports=None, targets=tuple(targets or DEFAULT_TARGETS))
    try:
        full = {}
        for m in net.module_names:
            layer = net[m]
            a = torch.zeros_like(layer.lora_A, device="cpu")
            b = torch.zeros_like(layer.lora_B, device="cpu")
            if m in factors:
                d, u = factors[m]
                a[: d.shape[0]] = d.float()
                b[:, : u.shape[1]] = u.float()
            full[m] = (a, b)
        net.load_factors(full)
        return heldout_denoising_loss(pipe.unet, net, latents, encoder_hidden_states, "identity",
                                      n_timesteps=n_timesteps)
    finally:
        net.remove()


class _Fidelity:
    def __init__(self, pipe, key: SealKey, data, prompt: str, n_timesteps: int):
        from .evaluation import heldout_batch, heldout_denoising_loss

        self.pipe, self.n_timesteps = pipe, n_timesteps
        self.targets = tuple(key.target_modules) or None
        self.latents, self.ehs = heldout_batch(pipe, data, prompt)
        self.base = heldout_denoising_loss(pipe.unet, None, self.latents, self.ehs, "off", n_timesteps=n_timesteps)
        self.release = None

    def loss(self, factors: Factors) -> float:
        return lora_heldout_loss(self.pipe, factors, self.latents, self.ehs, targets=self.targets,
                                 n_timesteps=self.n_timesteps)

    def measure(self, factors: Factors) -> dict:
        loss = self.loss(factors)
        gain = self.base - self.release if self.release is not None else float("nan")
        return {"loss": loss, "retained": (self.base - loss) / gain if gain and math.isfinite(gain) and gain > 0
                else float("nan")}


# -- the claim check, many forged C_p against one pipeline --------------------------------------------------------------
class _ClaimBench:
    """The claim check of :func:`seal_diffusion.claim.check_claim` for many forged C_p at once.

    B, A and C never change between forgeries, so the release check (R1), the losses with C and without the LoRA,
    and the images with C are computed once; each forgery costs one loss and one image batch with its C_p. The
    criteria and thresholds are claim.py's (the full run cross-checks γ = 0 against ``check_claim``).
    """

    def __init__(self, pipe, key: SealKey, suspect: Suspect, latents, ehs, prompt: str, seeds, n_timesteps: int,
                 steps: int = 10):
        from .claim import DEFAULT_MAX_GAP, DEFAULT_MIN_SSIM, DEFAULT_TOL
        from .compare import default_size, generate, seal_network_for
        from .evaluation import heldout_denoising_loss

        self.max_gap, self.min_ssim = DEFAULT_MAX_GAP, DEFAULT_MIN_SSIM
        self.pipe, self.key, self.latents, self.ehs, self.n_timesteps = pipe, key, latents, ehs, n_timesteps
        rep = verify(key, suspect)
        err = rep.reconstruction_error if rep.reconstruction_error is not None else float("inf")
        self.r1 = (err <= DEFAULT_TOL and rep.n_modules_missing == 0, err)
        size = default_size(pipe)
        self.jobs = [(prompt, s) for s in seeds]
        self.gen = dict(steps=steps, guidance_scale=1.0, height=size, width=size)
        self._generate, self._loss = generate, heldout_denoising_loss
        self.net = seal_network_for(pipe, key)
        self.loss_c = self._loss(pipe.unet, self.net, latents, ehs, "C", n_timesteps=n_timesteps)
        self.loss_off = self._loss(pipe.unet, self.net, latents, ehs, "off", n_timesteps=n_timesteps)
        with self.net.passport("C"):
            self.img_c = generate(pipe, self.jobs, **self.gen)

    def evaluate(self, forged: SealKey) -> dict:
        from .metrics import mean_std, ssim
        from .passport import pair_problem

        problems = [(n, pair_problem(mk.passport, mk.passport_p)) for n, mk in forged.modules.items()]
        problems = [(n, p) for n, p in problems if p]
        saved = {n: layer.passport_p for n, layer in self.net.items()}
        try:
            for n, layer in self.net.items():
                layer.passport_p = forged.modules[n].passport_p.detach().float().to(layer.lora_A.device)
            loss_p = self._loss(self.pipe.unet, self.net, self.latents, self.ehs, "C_p", n_timesteps=self.n_timesteps)
            with self.net.passport("C_p"):
                img_p = self._generate(self.pipe, self.jobs, **self.gen)
        finally:
            for n, layer in self.net.items():
                layer.passport_p = saved[n]
        improvement = self.loss_off - self.loss_c
        gap = (loss_p - self.loss_c) / improvement if improvement > 1e-12 else float("inf")
        sim = mean_std(ssim(self.img_c, img_p))[0]
        checks = {"passports": not problems, "R1 reproduction": self.r1[0],
                  "R2 fidelity": gap <= self.max_gap and sim >= self.min_ssim}
        return {"accepted": all(checks.values()), "checks": checks, "loss_gap": gap, "ssim_C_Cp": sim,
                "loss_C_p": loss_p, "passport_problem": problems[0][1] if problems else None}

    def close(self) -> None:
        self.net.remove()


# -- innocents ----------------------------------------------------------------------------------------------------------
def _decoy_key(key: SealKey, i: int, seed: int) -> SealKey:
    from .passport import make_passports

    decoy = make_passports(list(key.modules), key.rank, f"robustness decoy {seed} {i}")
    return SealKey({n: ModuleKey(mk.lora_A, mk.lora_B, decoy[n][0], decoy[n][1]) for n, mk in key.modules.items()},
                   key.rank, key.alpha, key.base_model, key.target_modules)


def _random_lora(template: LoraFile, gen: torch.Generator, match_norms: dict[str, float] | None = None) -> LoraFile:
    """A LoRA of ``template``'s shapes with random factors; ``match_norms`` {module: ‖ΔW‖} rescales it to those norms."""
    entries = {stem: (torch.randn(d.shape, generator=gen) / math.sqrt(d.shape[1]),
                      torch.randn(u.shape, generator=gen) * 0.01) for stem, (d, u) in template.entries.items()}
    out = LoraFile(template.layout, entries, dict(template.metadata))
    for m, target in (match_norms or {}).items():
        stem = _stem(template, m)
        if stem in entries:
            d, u = entries[stem]
            norm = delta_norms({m: (d, u)})[m]
            entries[stem] = (d, u * (target / norm)) if norm > 0 else (d, u)
    return out


def _stem(lora: LoraFile, module: str) -> str:
    from .lora_file import kohya_stem

    return module if lora.layout == "diffusers" else kohya_stem(module)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a binomial proportion (k of n)."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(confidence, k + 1, n - k))


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
    from . import attacks
    from .base_model import load_pipeline
    from .claim import forge_passport_p

    t0 = time.time()
    key_label = "(in memory)" if isinstance(key, SealKey) else str(key)
    key = key if isinstance(key, SealKey) else SealKey.load(key)
    lora_path = Path(lora)
    release = read_lora(lora_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_for(quick, finetune_lrs=finetune_lrs, finetune_steps=finetune_steps,
                    trained_innocents=trained_innocents, distill=distill)
    tick = _Ticker(_plan_units(plan), progress)
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
            from .subject import write_subject

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
            import warnings

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
        from .verify import load_suspect

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
                                     config, prompt, lambda s, n, *_: _advance(tick, done0 + s,
                                                                               f"fine-tune lr {lr:g}: step {s}/{n}"))
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
            from .claim import check_claim

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
    files = _write_report(report, out_dir)
    tick("report written")
    report["files"] = {k: str(v) for k, v in files.items()}
    return report


def _distillation(plan, key, lora_path, pipe, base, config, threshold, seed, tmp: Path, tick, base_row, trained,
                  check) -> dict:
    """Rows for the release, each distilled copy and the trained innocents: fidelity kept, weight test, function
    test (its probes computed once, not cached on disk) and the Bonferroni-combined verdict."""
    if not plan.distill:
        return {"rows": [], "n_probes": 0}
    from .distill import distill_lora, fidelity_of
    from .functional import combined_neg_log10_p, functional_test, merge_lora_into, owner_cache, restore_weights, \
        suspect_outputs

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
                           progress=lambda s, n: _advance(tick, done0 + s, f"distill rank {rank}: step {s}/{n}"))
        w, _, _ = check(read_lora(res.path), f"distill r{rank} {steps}", fid=False)
        rows.append(row(f"distill rank {rank}, {steps} steps", res.path, w["neg_log10_p"], res.fidelity))
        tick(f"distill rank {rank}, {steps} steps: verify")
    for i, path in enumerate(trained):
        w, _, _ = check(read_lora(path), f"innocent {i}", fid=False)
        rows.append(row(f"innocent: same-subject plain LoRA #{i + 1}", path, w["neg_log10_p"],
                        fidelity_of(path, lora_path, pipe=pipe)))
    return {"rows": rows, "n_probes": plan.functional_probes}


def _advance(tick: _Ticker, done: int, label: str) -> None:
    tick(label, max(done - tick.done, 0))


def _finetune(lora_path, out, data, base, steps, lr, seed, config, prompt, callback) -> Path:
    from .finetune import finetune_lora

    return finetune_lora(lora_path, out, data=data, base=base, steps=steps, learning_rate=lr, seed=seed,
                         overwrite=True, config=config, instance_prompt=prompt, progress_callback=callback)


def _train_innocents(plan: Plan, base, data, prompt, config, rank, seed, tmp: Path, tick) -> list[Path]:
    from .training import parse_args, train

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
                       lambda s, n, *_: _advance(tick, done0 + s, f"innocent LoRA #{i + 1}: step {s}/{n}"))
        result["network"].remove()
        paths.append(Path(result["lora_path"]))
    return paths


def _innocents(key, release, base_suspect, trained, plan, threshold, seed, prepared, geometry, tick) -> dict:
    modules = list(key.modules)
    kinds: dict[str, list[dict]] = {"decoy key": [], "random LoRA": [], "same-subject plain LoRA": []}

    def record(kind: str, k, s: Suspect, geo) -> None:
        rep = verify(k, s, threshold)
        meas = geo.measures(s.factors)
        kinds[kind].append({"neg_log10_p": rep.neg_log10_p, "z": rep.z,
                            "weighted_pair": weighted_neg_log10_p(rep, meas, "pair"),
                            "weighted_subspace": weighted_neg_log10_p(rep, meas, "subspace")})

    for i in range(plan.n_decoys):
        dk = _decoy_key(key, i, seed)
        record("decoy key", prepared.with_passports(dk), base_suspect, geometry.with_passports(dk))
        tick("innocents: decoy keys")
    gen = torch.Generator().manual_seed(seed + 7)
    for i in range(plan.n_random):
        lf = _random_lora(release, gen)
        record("random LoRA", prepared, Suspect(f"random {i}", lf.layout, factors=lf.by_module(modules)), geometry)
        tick("innocents: random LoRAs")
    for path in trained:
        lf = read_lora(path)
        record("same-subject plain LoRA", prepared, Suspect(str(path), lf.layout, factors=lf.by_module(modules)),
               geometry)
    all_rows = [r for rs in kinds.values() for r in rs]
    n = len(all_rows)
    out = {"n": n, "by_kind": {}, "threshold": threshold}
    for stat in ("neg_log10_p", "weighted_pair", "weighted_subspace"):
        k = sum(r[stat] >= threshold for r in all_rows)
        out[stat] = {"false_positives": k, "rate": k / n if n else float("nan"),
                     "upper_95": clopper_pearson_upper(k, n), "max": max((r[stat] for r in all_rows), default=0.0),
                     "at_alpha_0.1": sum(r[stat] >= 1.0 for r in all_rows)}
    for kind, rs in kinds.items():
        if rs:
            vals = [r["neg_log10_p"] for r in rs]
            out["by_kind"][kind] = {"n": len(rs), "false_positives": sum(v >= threshold for v in vals),
                                    "max_neg_log10_p": max(vals), "median_neg_log10_p": float(np.median(vals)),
                                    "values": vals}
    return out


def _gamma_threshold(rows: list[dict], check: str | None = None) -> float | None:
    """The smallest γ from which on every forged claim fails (``check``: that check alone); None if γ = 1 passes."""
    thr = None
    for r in sorted(rows, key=lambda r: -r["gamma"]):
        if (r["checks"][check] if check else r["accepted"]):
            break
        thr = r["gamma"]
    return thr


def _why(row: dict) -> list[str]:
    """Why a forged claim failed, one phrase per failed check ('|' escaped for markdown tables)."""
    out = []
    for name, ok in row["checks"].items():
        if ok:
            continue
        if name == "passports":
            out.append(f"passports: {row['passport_problem']}".replace("|", "\\|"))
        elif name == "R2 fidelity":
            out.append(f"R2 fidelity: gap {_f(row['loss_gap'], 2)}, SSIM {_f(row['ssim_C_Cp'], 3)}")
        else:
            out.append(name)
    return out


# -- the report ---------------------------------------------------------------------------------------------------------
def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _json_safe(obj.item())
    return obj


def _f(x, digits: int = 2) -> str:
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def _write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    from .fileio import write_json_atomic, write_text_atomic

    files = {
        "attacks_plot": plot_attacks(report, out_dir / "attacks.png"),
        "prune_plot": plot_pruning(report, out_dir / "pruning.png"),
        "finetune_plot": plot_finetune(report, out_dir / "finetune.png"),
        "gamma_plot": plot_gamma(report, out_dir / "gamma.png"),
        "innocents_plot": plot_innocents(report, out_dir / "innocents.png"),
    }
    files["report_md"] = write_text_atomic(out_dir / "report.md", report_markdown(report))
    files["report_json"] = write_json_atomic(out_dir / "report.json", _json_safe(report))
    return files


def report_markdown(r: dict) -> str:
    m, thr = r["meta"], r["meta"]["threshold"]
    inn = r["innocents"]
    lines = [
        "# SEAL robustness report",
        "",
        f"LoRA `{m['lora']}` ({m['layout']}, rank {m['rank']}, {m['n_modules']} modules), base `{m['base']}`, "
        f"subject `{m['data']}` (prompt “{m['prompt']}”). {'Quick' if m['quick'] else 'Full'} matrix, "
        f"{r['seconds']:.0f} s. Detection: −log10 p ≥ {thr} (exact sign-flip test; the floor for "
        f"{m['n_modules']} modules is {m['n_modules'] * math.log10(2):.1f}).",
        "",
        f"Fidelity = held-out denoising loss on the subject (fixed noise/timesteps): base {m['base_loss']:.4f}, "
        f"release {m['release_loss']:.4f}; *retained* = (L_base − L)/(L_base − L_release), 1 = as good as the "
        "release, 0 = no better than the base.",
        "",
        "## Summary: attack → verdict",
        "",
        "| group | attack | −log10 p | detected | weighted (pair / subspace) | rel. error | loss | retained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in r["attacks"]:
        lines.append(f"| {a['group']} | {a['attack']} | {_f(a['neg_log10_p'])} | {'yes' if a['detected'] else '**no**'} "
                     f"| {_f(a.get('weighted_pair'))} / {_f(a.get('weighted_subspace'))} "
                     f"| {_f(a.get('reconstruction_error'), 3)} | {_f(a.get('loss'), 4)} | {_f(a.get('retained'))} |")
    obf = [a for a in r["attacks"] if a["group"] == "obfuscation"]
    lines += ["", f"Product-preserving obfuscations leave −log10 p unchanged (to 1e-6 relative): "
              f"{'yes' if all(a['unchanged'] for a in obf) else 'NO'} ({len(obf)} checked). "
              "![attacks](attacks.png)", "", "## 1. Pruning (paper Fig. 3)", "",
              "| on | ratio | −log10 p | detected | retained |", "|---|---|---|---|---|"]
    for p in sorted(r["pruning"], key=lambda p: (p["on"], p["ratio"])):
        lines.append(f"| {p['on']} | {p['ratio']:g} | {_f(p['neg_log10_p'])} | {'yes' if p['detected'] else '**no**'} "
                     f"| {_f(p.get('retained'))} |")
    lines += ["", "![pruning](pruning.png)", "",
              "## 2. Fine-tuning (continued plain-LoRA training from the release)", "",
              "Weighted columns: the same exact sign-flip test on w_m·d_m with w_m = 1/(0.05 + measure), the measure "
              "being swap-symmetric in (C, C_p) — *pair*: min over t ∈ {C, C_p} of ‖ΔŴ − s·B·C_t·A‖/‖s·B·C_t·A‖; "
              "*subspace*: share of ΔŴ outside span(B) × rowspan(A). Any weights that depend only on the suspect, "
              "B, A and the unordered pair {C, C_p} keep the test exact (a swap flips d_m and leaves w_m); weights "
              "from the released C alone would not.", "",
              "| lr | steps | −log10 p | weighted pair | weighted subspace | median rel. change | retained |",
              "|---|---|---|---|---|---|---|"]
    for ft in r["finetune"]:
        for p in ft["points"]:
            lines.append(f"| {ft['lr']:g} | {p['steps']} | {_f(p['neg_log10_p'])} | {_f(p['weighted_pair'])} | "
                         f"{_f(p['weighted_subspace'])} | {_f(p['median_rel_change'], 3)} | {_f(p.get('retained'))} |")
    for ft in r["finetune"]:
        last = ft["points"][-1]
        if last["steps"] and last.get("per_module"):
            busy = sorted(last["per_module"], key=lambda q: -(q["rel_change"] or 0))
            lines += ["", f"Busiest layers after {last['steps']} steps at lr {ft['lr']:g} (rel. change, d_m): "
                      + "; ".join(f"`{q['module']}` {q['rel_change']:.3f}, {q['stat']:.2f}" for q in busy[:5])
                      + f". Quietest: `{busy[-1]['module']}` {busy[-1]['rel_change']:.3f}."]
    survived = {ft["lr"]: max([p["steps"] for p in ft["points"] if p["detected"]], default=None) for ft in r["finetune"]}
    lines += ["", "Largest fine-tune step count still detected: "
              + ", ".join(f"lr {lr:g}: {s}" for lr, s in survived.items()) + ".", "", "![finetune](finetune.png)", "",
              "## 3. Ambiguity: forged second passports (paper Fig. 4)", "",
              "C̃_p = (1−γ)·C_p + γ·R (R random, same σ). Accepted when the fidelity gap ≤ 0.25 and SSIM(C, C̃_p) ≥ 0.8 "
              "(claim.py's thresholds) and the pair is acceptable.", "",
              "| γ | loss gap | SSIM C vs C̃_p | R2 fidelity | claim |", "|---|---|---|---|---|"]
    for g in r["gamma"]:
        lines.append(f"| {g['gamma']:g} | {_f(g['loss_gap'], 3)} | {_f(g['ssim_C_Cp'], 3)} | "
                     f"{'ok' if g['checks']['R2 fidelity'] else 'fails'} | "
                     f"{'accepted' if g['accepted'] else 'rejected'} |")
    gt = r["gamma_threshold"]
    gf = r.get("gamma_threshold_fidelity")
    lines += ["", (f"Claims fail from γ = {gt:g} on" if gt is not None else "Even γ = 1 passes")
              + (f"; the fidelity check (R2) alone fails from γ = {gf:g} on." if gf is not None else
                 "; the fidelity check (R2) alone never fails in this sweep.")
              + " (At small rank a random C̃_p also trips the passport-pair check, |corr| > 0.5 with C in some"
              " module, so the R2 column is the one that measures the forgery.)",
              "", "| forgery | loss gap | SSIM | claim | why |", "|---|---|---|---|---|"]
    for fg in r["forgeries"]:
        why = "; ".join(_why(fg)) or "–"
        lines.append(f"| {fg['mode']} | {_f(fg['loss_gap'], 3)} | {_f(fg['ssim_C_Cp'], 3)} | "
                     f"{'**accepted**' if fg['accepted'] else 'rejected'} | {why} |")
    lib = r.get("claim_library_check")
    if lib:
        verdict = "accepted" if lib["accepted"] else "REJECTED"
        lines += ["", f"Cross-check with `claim.check_claim` on the real key: {verdict}"
                  f", loss gap {_f(lib['loss_gap'], 4)}, SSIM {_f(lib['ssim_C_Cp'], 4)}."]
    lines += ["", "![gamma](gamma.png)", "", "## 5. Innocents", "", "| kind | n | detected | max −log10 p | median |",
              "|---|---|---|---|---|"]
    for kind, k in inn["by_kind"].items():
        lines.append(f"| {kind} | {k['n']} | {k['false_positives']} | {_f(k['max_neg_log10_p'])} | "
                     f"{_f(k['median_neg_log10_p'])} |")
    for stat, label in (("neg_log10_p", "contrast (default)"), ("weighted_pair", "weighted pair"),
                        ("weighted_subspace", "weighted subspace")):
        s = inn[stat]
        lines.append(f"\n{label}: {s['false_positives']} of {inn['n']} innocents detected (rate {s['rate']:.3%}, "
                     f"95 % upper bound {s['upper_95']:.2%}); at α = 0.1: {s['at_alpha_0.1']} "
                     f"(expected ≈ {0.1 * inn['n']:.0f} — the test is exact, not conservative).")
    lines += ["", "![innocents](innocents.png)", ""]
    dist = r.get("distillation") or {}
    if dist.get("rows"):
        lines += ["## 6. Distillation (a fresh LoRA trained to reproduce the release's noise predictions)", "",
                  "Fidelity kept = 1 − ‖f_copy − f_release‖²/‖f_base − f_release‖² on fresh random inputs. The weight "
                  "test recovers the passport per layer; the function test (`verify --functional`, "
                  f"{dist['n_probes']} secret probes) looks for the release coin in the model's outputs. Combined: "
                  "Bonferroni, p = min(1, 2·min(p_weight, p_function)).", "",
                  "| suspect | fidelity kept | weight −log10 p | function −log10 p | combined | detected |",
                  "|---|---|---|---|---|---|"]
        for d in dist["rows"]:
            lines.append(f"| {d['attack']} | {_f(d['fidelity_kept'], 3)} | {_f(d['neg_log10_p'])} | "
                         f"{_f(d['functional_neg_log10_p'])} | {_f(d['combined_neg_log10_p'])} | "
                         f"{'yes' if d['combined_detected'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------------------------------
def _plt():
    from .plots import _pyplot

    return _pyplot()


def _save(fig, path) -> Path:
    from .plots import _save as save

    return save(fig, path)


def _threshold_line(ax, thr: float) -> None:
    ax.axhline(thr, color="crimson", linestyle="--", linewidth=1, label=f"threshold {thr}")


def plot_attacks(r: dict, path) -> Path:
    """−log10 p per attack (horizontal bars) with the detection threshold."""
    plt = _plt()
    rows = r["attacks"]
    fig, ax = plt.subplots(figsize=(7.5, 0.22 * len(rows) + 1.4), dpi=110)
    y = np.arange(len(rows))
    colors = ["tab:green" if a["detected"] else "tab:red" for a in rows]
    ax.barh(y, [a["neg_log10_p"] for a in rows], color=colors)
    ax.set_yticks(y, [a["attack"] for a in rows], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(r["meta"]["threshold"], color="crimson", linestyle="--", linewidth=1)
    ax.set_xlabel("−log10 p (green: detected)")
    ax.set_title("Watermark evidence after each attack", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_pruning(r: dict, path) -> Path:
    """−log10 p and retained fidelity vs pruning ratio, factors and ΔW (paper Fig. 3)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for on, marker in (("factors", "o"), ("delta", "s")):
        pts = sorted((p for p in r["pruning"] if p["on"] == on), key=lambda p: p["ratio"])
        x = np.arange(len(pts))
        a1.plot(x, [p["neg_log10_p"] for p in pts], marker=marker, label=f"prune {on}")
        a2.plot(x, [p.get("retained", np.nan) for p in pts], marker=marker, label=f"prune {on}")
        for ax in (a1, a2):
            ax.set_xticks(x, [f"{p['ratio']:g}" for p in pts])
    _threshold_line(a1, r["meta"]["threshold"])
    a1.set_ylabel("−log10 p")
    a2.set_ylabel("retained improvement over base")
    a2.axhline(1, color="gray", linewidth=0.8)
    a2.axhline(0, color="gray", linewidth=0.8)
    for ax in (a1, a2):
        ax.set_xlabel("pruning ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Pruning: evidence and fidelity (SEAL Fig. 3)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_finetune(r: dict, path) -> Path:
    """−log10 p (default and weighted) vs fine-tune steps; per-module relative change vs per-module d_m."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.8), dpi=120)
    for ft in r["finetune"]:
        steps = [p["steps"] for p in ft["points"]]
        for stat, style, label in (("neg_log10_p", "-o", "contrast"), ("weighted_pair", "--s", "weighted pair"),
                                   ("weighted_subspace", ":^", "weighted subspace")):
            a1.plot(steps, [p[stat] for p in ft["points"]], style, label=f"{label}, lr {ft['lr']:g}")
        for p in ft["points"]:
            if p["steps"] and p.get("per_module"):
                a2.scatter([q["rel_change"] for q in p["per_module"]], [q["stat"] for q in p["per_module"]], s=8,
                           label=f"{p['steps']} steps, lr {ft['lr']:g}")
    _threshold_line(a1, r["meta"]["threshold"])
    a1.set_xlabel("fine-tune steps")
    a1.set_ylabel("−log10 p")
    a1.legend(fontsize=6)
    a1.grid(alpha=0.3)
    a2.axhline(0, color="gray", linewidth=0.8)
    a2.set_xlabel("per-module ‖ΔW_ft − ΔW‖ / ‖ΔW‖")
    a2.set_ylabel("per-module contrast d_m")
    if a2.collections:
        a2.set_xscale("log")
        a2.legend(fontsize=6)
    a2.grid(alpha=0.3)
    fig.suptitle("Fine-tuning: pooled evidence, and which layers are busy", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_gamma(r: dict, path) -> Path:
    """Fidelity gap and SSIM of C vs forged C_p against γ, with the claim thresholds (paper Fig. 4)."""
    from .claim import DEFAULT_MAX_GAP, DEFAULT_MIN_SSIM

    plt = _plt()
    rows = sorted(r["gamma"], key=lambda g: g["gamma"])
    gam = [g["gamma"] for g in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    a1.plot(gam, [g["loss_gap"] for g in rows], marker="o")
    a1.axhline(DEFAULT_MAX_GAP, color="crimson", linestyle="--", linewidth=1, label=f"max gap {DEFAULT_MAX_GAP}")
    a1.set_ylabel("loss gap (share of C's improvement lost)")
    a2.plot(gam, [g["ssim_C_Cp"] for g in rows], marker="o")
    a2.axhline(DEFAULT_MIN_SSIM, color="crimson", linestyle="--", linewidth=1, label=f"min SSIM {DEFAULT_MIN_SSIM}")
    a2.set_ylabel("SSIM, C vs forged C_p images")
    for ax in (a1, a2):
        for g in rows:
            ok = g["checks"]["R2 fidelity"]
            ax.axvspan(g["gamma"] - 0.02, g["gamma"] + 0.02, color="tab:green" if ok else "tab:red", alpha=0.15,
                       linewidth=0)
        ax.set_xlabel("γ (share of the forgery in C_p)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Ambiguity attack: forged second passports (green: fidelity check R2 passed)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_innocents(r: dict, path) -> Path:
    """Histogram of −log10 p over the innocents, by kind, with the threshold."""
    plt = _plt()
    inn = r["innocents"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    top = max([r["meta"]["threshold"] + 0.5] + [k["max_neg_log10_p"] for k in inn["by_kind"].values()])
    bins = np.linspace(0, top, 30)
    for kind, k in inn["by_kind"].items():
        ax.hist(k["values"], bins=bins, alpha=0.6, label=f"{kind} (n={k['n']})")
    ax.axvline(r["meta"]["threshold"], color="crimson", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlabel("−log10 p")
    ax.set_ylabel("count")
    ax.set_title(f"Innocents: {inn['neg_log10_p']['false_positives']} of {inn['n']} detected", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# -- command line -------------------------------------------------------------------------------------------------------
def add_robustness_command(subparsers) -> argparse.ArgumentParser:
    """Register ``robustness`` on an argparse subparsers object (the CLI wires it in)."""
    p = subparsers.add_parser("robustness", help="run the attack matrix; report.md, report.json, plots")
    p.add_argument("--key", required=True, help="the private .sealkey file")
    p.add_argument("--lora", required=True, help="the released LoRA (kohya file or diffusers file/folder)")
    p.add_argument("--base", default="tiny", help="base model: tiny, hub id, diffusers folder or .safetensors")
    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file base")
    p.add_argument("--data", default=None, help="folder of subject images (default: the bundled subject)")
    p.add_argument("--prompt", default="a photo of sks cat", help="instance prompt of the subject")
    p.add_argument("--out", required=True, help="output folder (report.md, report.json, *.png)")
    p.add_argument("--quick", action="store_true", help="the small matrix (about a minute on the tiny model)")
    p.add_argument("--finetune-lr", dest="finetune_lr", type=float, nargs="+", default=None,
                   help="learning rate(s) of the fine-tuning attack (default 5e-5, the paper's LoRA rate)")
    p.add_argument("--finetune-steps", dest="finetune_steps", type=int, nargs="+", default=None,
                   help="fine-tune step counts (default 25 50 100; quick: 8)")
    p.add_argument("--trained-innocents", dest="trained_innocents", type=int, default=None,
                   help="same-subject plain LoRAs to train as innocents (default 2; quick: 0)")
    p.add_argument("--distill", nargs="+", default=None, metavar="RANK:STEPS",
                   help="distillation rows (student rank:steps; default 4:100 4:400; quick: none); each row "
                   "reports fidelity kept, the weight test and the function-level test")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="detection threshold on −log10 p")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_robustness)
    return p


def _distill_specs(specs) -> list[tuple[int, int]] | None:
    if specs is None:
        return None
    out = []
    for spec in specs:
        r, _, n = str(spec).partition(":")
        try:
            out.append((int(r), int(n)))
        except ValueError:
            raise UserError(f"--distill {spec!r}: expected RANK:STEPS, e.g. 4:400") from None
    return out


def cmd_robustness(args) -> int:
    from tqdm import tqdm

    bar = tqdm(total=1, desc="robustness", unit="step", dynamic_ncols=True, disable=None)

    def progress(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_description_str(label[:48])
        bar.refresh()

    try:
        report = run_robustness(args.key, args.lora, args.base, args.data, args.out, quick=args.quick,
                                progress=progress, prompt=args.prompt, config=args.config, threshold=args.threshold,
                                seed=args.seed, finetune_lrs=args.finetune_lr, finetune_steps=args.finetune_steps,
                                trained_innocents=args.trained_innocents, distill=_distill_specs(args.distill))
    finally:
        bar.close()
    for a in report["attacks"]:
        print(f"{a['attack']:<60} −log10 p {a['neg_log10_p']:6.2f}  {'detected' if a['detected'] else 'NOT detected'}")
    for d in (report.get("distillation") or {}).get("rows", []):
        print(f"{d['attack']:<44} fidelity {d['fidelity_kept']:.3f}  weight {d['neg_log10_p']:5.2f}  "
              f"function {d['functional_neg_log10_p']:5.2f}  {'detected' if d['combined_detected'] else 'NOT detected'}")
    inn = report["innocents"]
    print(f"innocents: {inn['neg_log10_p']['false_positives']} of {inn['n']} detected "
          f"(95 % upper bound {inn['neg_log10_p']['upper_95']:.2%}); claims fail from γ = {report['gamma_threshold']}")
    files = report["files"]
    print(f"wrote {files['report_md']}, {files['report_json']} and plots ({report['seconds']:.0f} s)")
    return 0
