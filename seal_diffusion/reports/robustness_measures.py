"""What the attack matrix measures on one suspect, beyond the weight test of :mod:`seal_diffusion.detection.verify`.

* **Factor algebra** — per-module relative change ‖ΔW_new − ΔW_old‖/‖ΔW_old‖ and ‖ΔW‖ from the factors, ΔW never
  formed.
* **Weighted pooling** (below) — two swap-symmetric per-module weights that lean on the quiet layers of a fine-tuned
  copy, and the exact sign-flip p-value of the weighted statistic.
* **Fidelity** — the held-out denoising loss with a LoRA's factors (:func:`lora_heldout_loss`), and the share of the
  release's improvement over the base that an attacked copy retains.
* **The claim check for many forged C_p** (:class:`_ClaimBench`), the paper's Fig. 4 without reloading anything.
* **Innocents** — decoy keys, random LoRAs of the release's shapes, and the detected fraction with a one-sided 95 %
  Clopper–Pearson upper bound.

**Weighted pooling stays exact.** The default test is the sign-flip test on the per-module contrast d_m
(:func:`seal_diffusion.detection.verify.contrast_t`). Under H0 the release coin makes the labels (C, C_p) of each module a fair coin given
everything else, and swapping them flips the sign of d_m. So for **any** weights w_m ≥ 0 that are functions of the
suspect, B, A and the *unordered* pair {C_m, C_p,m} (hence unchanged by a swap), Σ w_m d_m has exactly the law of
Σ ε_m w_m |d_m| and :func:`~seal_diffusion.detection.verify.sign_flip_neg_log10_p` on (w_m d_m) is an exact p-value. Weights built
from the *released* C alone (e.g. the true relative change ‖ΔŴ − s·B·C·A‖/‖s·B·C·A‖) are not symmetric and would
break exactness. The two symmetric weights measured here:

* ``pair``: w_m = 1/(ε + min_t ‖ΔŴ_m − s·B·C_t·A‖/‖s·B·C_t·A‖) over t ∈ {C, C_p} (min is symmetric; for a
  fine-tuned copy it is the relative change from the release);
* ``subspace``: w_m = 1/(ε + ρ_m), ρ_m = ‖ΔŴ_m − P_B ΔŴ_m P_A‖/‖ΔŴ_m‖, the share of the suspect's update outside
  the owner's column/row spaces (suspect, B, A only).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import beta

from ..ownership.claim import DEFAULT_MAX_GAP, DEFAULT_MIN_SSIM, DEFAULT_TOL
from ..core.network import network_from_key
from ..evaluation.render import default_size, generate
from ..evaluation.heldout import heldout_batch, heldout_denoising_loss
from ..core.keyfile import ModuleKey, SealKey
from ..formats.lora_file import LoraFile, kohya_stem, read_lora
from ..evaluation.metrics import mean_std, ssim
from ..core.network import DEFAULT_TARGETS, SealNetwork
from ..core.passport import make_passports, pair_problem
from ..detection.verify import Suspect, sign_flip_neg_log10_p, verify

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (down r×in, up out×r)}, ΔW = up @ down

WEIGHT_EPS = 0.05


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
    """The claim check of :func:`seal_diffusion.ownership.claim.check_claim` for many forged C_p at once.

    B, A and C never change between forgeries, so the release check (R1), the losses with C and without the LoRA,
    and the images with C are computed once; each forgery costs one loss and one image batch with its C_p. The
    criteria and thresholds are claim.py's (the full run cross-checks γ = 0 against ``check_claim``).
    """

    def __init__(self, pipe, key: SealKey, suspect: Suspect, latents, ehs, prompt: str, seeds, n_timesteps: int,
                 steps: int = 10):
        self.max_gap, self.min_ssim = DEFAULT_MAX_GAP, DEFAULT_MIN_SSIM
        self.pipe, self.key, self.latents, self.ehs, self.n_timesteps = pipe, key, latents, ehs, n_timesteps
        rep = verify(key, suspect)
        err = rep.reconstruction_error if rep.reconstruction_error is not None else float("inf")
        self.r1 = (err <= DEFAULT_TOL and rep.n_modules_missing == 0, err)
        size = default_size(pipe)
        self.jobs = [(prompt, s) for s in seeds]
        self.gen = dict(steps=steps, guidance_scale=1.0, height=size, width=size)
        self._generate, self._loss = generate, heldout_denoising_loss
        self.net = network_from_key(key, pipe)
        self.loss_c = self._loss(pipe.unet, self.net, latents, ehs, "C", n_timesteps=n_timesteps)
        self.loss_off = self._loss(pipe.unet, self.net, latents, ehs, "off", n_timesteps=n_timesteps)
        with self.net.passport("C"):
            self.img_c = generate(pipe, self.jobs, **self.gen)

    def evaluate(self, forged: SealKey) -> dict:
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
    return module if lora.layout == "diffusers" else kohya_stem(module)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a binomial proportion (k of n)."""
    return 1.0 if k >= n else float(beta.ppf(confidence, k + 1, n - k))


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

