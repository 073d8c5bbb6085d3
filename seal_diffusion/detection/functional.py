"""The function-level ownership test: does the suspect *behave* like the release, on the release coin's side?

Why. The weight test (:mod:`seal_diffusion.detection.verify`) recovers the passport from each layer's ΔW. A thief who
*distils* the release — trains a fresh LoRA to reproduce its noise predictions — keeps the LoRA's effect but not its
per-layer weights, and the weight test finds nothing. The release coin is still in the function, and this module
tests it there.

How. Per key module l let M_l = (C_l + C_p,l)/2 and D_l = (C_l − C_p,l)/2 (C the released passport). The owner's
network with passport M_l + t_l·D_l in every layer (:meth:`SealNetwork.set_interp`) is f(t): t = 1 is the release,
t = 0 the midpoint. On secret probes (noise latents, timesteps, prompts):

* f_mid = f(0) does not depend on the coins (M is symmetric in C, C_p);
* the direction of layer l, g_l = (f(+h·e_l) − f(−h·e_l)) / 2h (a central difference, h = 1 by default: the
  secant from C_p to C; h → 0 gives ∂f/∂t_l), flips sign exactly with layer l's coin and with nothing else;
* the suspect's residual r = f_suspect − f_mid is coin-independent when the suspect does not derive from the release.

The statistic is the least-squares fit of r on all directions at once, t̂ = (GᵀG + λI)⁻¹ Gᵀ r (``ls``, the default):
it removes the cross-talk between layers that makes the plain projections ⟨r, g_l⟩ (``projection``) noisy. With
E = diag(coins), G = G₀·E, so t̂ = E·t̂₀ where t̂₀ depends on nothing coin-related under H0: the signs of t̂ are fair
independent coins and the two-sided sign-flip test (:func:`seal_diffusion.detection.verify.two_sided_neg_log10_p`) gives an
**exact** p-value (floor 2^−(L−1), log10 2 below the one-sided 2^−L). A copy of the release has t̂ ≈ 1 in every
layer. A file meant to be loaded at strength −1 (up-weights negated) is run at +1 and at −1, and the loading whose
outputs are closer to f_mid is tested: f_mid is symmetric in C and C_p, so the choice never looks at the coins.

The suspect is loaded as a frontend loads it (:mod:`seal_diffusion.formats.suspect_weights`: every layout the weight test
reads, LyCORIS and conv layers included, alpha and dtype as stored); files used together are loaded at the strengths
the weight test fitted without the coins.

Probes come from a seed that is SHA-256 over the key's passports, each module's pair hashed in a coin-symmetric order
(so the probes carry no information on the coin, and nobody without C_p can compute them). What the owner needs —
probes, f_mid and the directions G — is computed once per (key, base model, probe settings) and kept **private**
beside the key (:func:`seal_diffusion.detection.probe_cache.cache_path`; safetensors, mode 0600), bound to the key's commitment and a SHA-256 of the base
UNet's weights; a cache that does not match is recomputed. At verify time only the suspect's forward on the probes
remains.

UNet modules only: the probes are UNet forwards, so a key's text-encoder modules (``--train_text_encoder``) are skipped
here; the weight test covers them.

Combined verdict: with both tests the reported p is Bonferroni's p = min(1, 2·min(p_weight, p_functional)), which
keeps the false-positive rate of "either test fires" at the threshold whatever the dependence between the tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.base_model import load_pipeline
from ..errors import UserError
from ..core.keyfile import SealKey
from .probe_cache import OwnerCache, base_fingerprint, cached, load_unet, owner_cache
from .probes import DEFAULT_PROBES, suspect_outputs
from ..progress import Ticker
from ..formats.suspect_weights import merge_suspect_into, restore
from .verify import _is_checkpoint_path, two_sided_neg_log10_p, verify_path

DEFAULT_RIDGE = 1e-2  # λ relative to the mean diagonal of GᵀG (measured best of 0…1; 0 lets ill-posed layers blow up)
STATISTICS = ("ls", "projection")
LOG10_2 = math.log10(2.0)


# -- the test ---------------------------------------------------------------------------------------------------------
@dataclass
class FunctionalReport:
    detected: bool
    neg_log10_p: float
    threshold: float
    statistic: str
    n_probes: int
    n_modules: int
    n_positive: int
    per_module: list[dict] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)  # parts of the suspect the UNet forwards do not use
    strength_sign: int = 1  # −1: the suspect was tested loaded at negative strength (closer to the owner's f_mid)

    def to_json(self) -> dict:
        return {"neg_log10_p": self.neg_log10_p, "detected": self.detected, "threshold": self.threshold,
                "statistic": self.statistic, "n_probes": self.n_probes, "n_modules": self.n_modules,
                "n_positive": self.n_positive, "per_module": self.per_module, "not_applied": self.not_applied,
                "strength_sign": self.strength_sign}


def module_stats(cache: OwnerCache, f_suspect: torch.Tensor, statistic: str = "ls", ridge: float = DEFAULT_RIDGE,
                 n_probes: int | None = None) -> torch.Tensor:
    """Per-module statistic d (length L) whose signs are fair coins under H0 (see module docstring)."""
    if statistic not in STATISTICS:
        raise UserError(f"functional statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    n = n_probes or cache.probes.n
    g = cache.directions[:, :n].reshape(cache.n_modules, -1).double()  # L × N
    r = (f_suspect[:n] - cache.f_mid[:n]).reshape(-1).double()
    gr = g @ r
    if statistic == "projection":
        return gr / g.norm(dim=1).clamp_min(1e-30)
    gram = g @ g.T
    lam = ridge * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), gr)


def functional_test(cache: OwnerCache, f_suspect: torch.Tensor, threshold: float = 3.3, statistic: str = "ls",
                    n_probes: int | None = None) -> FunctionalReport:
    d = module_stats(cache, f_suspect, statistic, n_probes=n_probes)
    nlp = two_sided_neg_log10_p(d.tolist())
    per = [{"module": m, "stat": float(v)} for m, v in zip(cache.modules, d)]
    return FunctionalReport(nlp >= threshold, nlp, threshold, statistic, n_probes or cache.probes.n,
                            cache.n_modules, int((d > 0).sum()), per)


def combined_neg_log10_p(*nlps: float) -> float:
    """Bonferroni over k tests: p = min(1, k·min p) → −log10 p = max(0, max −log10 p_i − log10 k)."""
    return max(0.0, max(nlps) - math.log10(len(nlps)))


def verify_functional(key: SealKey | str | os.PathLike, suspect_path, base: str | None = None, *,
                      threshold: float = 3.3, n_probes: int = DEFAULT_PROBES, prompts: list[str] | None = None,
                      statistic: str = "ls", config=None, key_path=None, use_cache: bool = True,
                      pipe=None, size: int | None = None, strengths=None, show_progress: bool = False
                      ) -> FunctionalReport:
    """Load the base, get the owner's cache, load the suspect into the base UNet and run the test.

    ``suspect_path``: LoRA file(s)/folder(s) loaded together at ``strengths`` (default 1 each) exactly as a frontend
    loads them (:mod:`seal_diffusion.formats.suspect_weights`: every layout the weight test reads), or one full model (its
    UNet is used). The files are run at +strengths and at −strengths, and the loading whose outputs are closer to the
    owner's midpoint f_mid (coin-symmetric) is tested: a copy meant for strength −1 is found, exactly.
    ``base``: default the base model the key records. ``show_progress``: a tqdm bar while the owner's
    cache is computed (the first run for a key and base: minutes on CPU)."""
    if isinstance(key, (str, os.PathLike)):
        key_path = key_path or key
        key = SealKey.load(key)
    if not base and pipe is None:
        base = key_base(key)
    paths = [Path(p) for p in ([suspect_path] if isinstance(suspect_path, (str, os.PathLike)) else suspect_path)]
    if not paths:
        raise UserError("--functional: no suspect given")
    for p in paths:
        if not p.exists():
            raise UserError(f"{p}: suspect not found")
    checkpoint = [p for p in paths if _is_checkpoint_path(p)]
    if checkpoint and len(paths) > 1:
        raise UserError(f"{checkpoint[0]}: a full model is tested alone, not together with other files")
    base_unet = pipe.unet if pipe is not None else load_unet(base, config)  # enough when the cache is warm
    fp = base_fingerprint(base_unet)
    cache = cached(key, base_unet, key_path, n_probes=n_probes, prompts=prompts, base_fp=fp, size=size) \
        if use_cache else None
    if cache is None:
        pipe = pipe or load_pipeline(base, config=config)
        tick = Ticker(n_probes, desc="function-level test: owner's probes (once per key and base)", unit="probe",
                      show=show_progress)
        try:
            cache = owner_cache(key, pipe, key_path=key_path, n_probes=n_probes, prompts=prompts, base_fp=fp,
                                use_cache=use_cache, size=size, progress=lambda done, total: tick.advance_to(done, ""))
        finally:
            tick.close()
        base_unet = pipe.unet
    not_applied: list[str] = []
    sign = 1
    if checkpoint:
        f_s = suspect_outputs(load_unet(str(paths[0]), config), cache.probes)
    else:
        strengths = [1.0] * len(paths) if strengths is None else [float(x) for x in strengths]
        outs = []
        for sign in (1, -1):  # loaded at +s and at −s (a file meant for a negative strength)
            originals, applied = merge_suspect_into(base_unet, paths, [sign * x for x in strengths])
            not_applied = applied.not_applied
            try:
                outs.append(suspect_outputs(base_unet, cache.probes))
            finally:
                restore(base_unet, originals)
        # the loading whose behaviour is closer to the owner's midpoint network f_mid: f_mid is symmetric in C and
        # C_p, so the choice never looks at the coins and the test stays exact
        dist = [float((o - cache.f_mid[: o.shape[0]]).double().norm()) for o in outs]
        sign = 1 if dist[0] <= dist[1] else -1
        f_s = outs[0] if sign == 1 else outs[1]
    report = functional_test(cache, f_s, threshold, statistic)
    report.not_applied, report.strength_sign = not_applied, sign
    return report


def key_base(key: SealKey) -> str:
    """The base model the key records (``--base`` default), or an error saying to pass ``--base``."""
    if key.base_model and key.base_model != "unknown":
        return key.base_model
    raise UserError("--functional needs --base MODEL: this key does not record its base model")


# -- both tests -------------------------------------------------------------------------------------------------------
@dataclass
class CombinedReport:
    """The weight test and the function-level test of one suspect, and the Bonferroni-combined verdict."""

    weight: object  # seal_diffusion.detection.verify.VerifyReport
    functional: FunctionalReport
    threshold: float

    @property
    def neg_log10_p(self) -> float:
        return combined_neg_log10_p(self.weight.neg_log10_p, self.functional.neg_log10_p)

    @property
    def detected(self) -> bool:
        return self.neg_log10_p >= self.threshold

    def to_json(self) -> dict:
        d = self.weight.to_json()
        d["neg_log10_p"], d["detected"] = self.neg_log10_p, self.detected
        d["correction"] = "bonferroni: p = min(1, 2·min(p_weight, p_functional))"
        d["weight"] = {"neg_log10_p": self.weight.neg_log10_p, "detected": self.weight.detected,
                       "statistic": self.weight.statistic, "n_modules": self.weight.n_modules}
        d["functional"] = self.functional.to_json()
        return d

    def summary(self) -> str:
        w, f = self.weight, self.functional
        verdict = "DETECTED: this is a copy of your LoRA" if self.detected else "not detected"
        return (f"{w.suspect}: {verdict} (combined −log10 p = {self.neg_log10_p:.1f}, threshold {self.threshold})\n"
                f"  weight test:     −log10 p = {w.neg_log10_p:.1f} ({w.n_modules} modules, "
                f"{w.n_modules_missing} missing)\n"
                f"  function test:   −log10 p = {f.neg_log10_p:.1f} ({f.n_positive} of {f.n_modules} layers on the "
                f"release's side, {f.n_probes} probes)"
                + ("\n  function test did not apply: " + "; ".join(f.not_applied) if f.not_applied else "")
                + "".join("\n" + line for line in w.summary().splitlines()[1:]))  # floor and commitment notes


def verify_both(key_path: str | os.PathLike, suspect_path, base: str | None = None, *,
                threshold: float = 3.3, statistic: str = "contrast", n_probes: int = DEFAULT_PROBES,
                prompts: list[str] | None = None, config=None, use_cache: bool = True, pipe=None,
                size: int | None = None, commitment: str | None = None, show_progress: bool = False) -> CombinedReport:
    """``verify --functional``: both tests, each judged at ``threshold`` alone, and the combined verdict.

    ``suspect_path``: LoRA file(s)/folder(s) used together, or one merged model. Several files are loaded at the
    strengths the weight test fitted (:func:`seal_diffusion.detection.verify.verify`; chosen without the coins, so both tests
    stay exact). ``base``: default the key's base model. ``commitment``: the published commitment the key must match.
    """
    paths = [suspect_path] if isinstance(suspect_path, (str, os.PathLike)) else list(suspect_path)
    key = SealKey.load(key_path)
    if not base and pipe is None:
        base = key_base(key)
    weight = verify_path(key, paths if len(paths) > 1 else paths[0], base=base, threshold=threshold,
                         statistic=statistic, config=config, commitment=commitment)
    # the weight test's fitted strengths without the sign it found (that sign depends on the coins); the function
    # test picks the sign itself, coin-blind
    strengths = [x * weight.sign for x in weight.strengths] if len(paths) > 1 and weight.strengths else None
    func = verify_functional(key, paths, base, threshold=threshold, n_probes=n_probes, prompts=prompts,
                             config=config, key_path=key_path, use_cache=use_cache, pipe=pipe, size=size,
                             strengths=strengths, show_progress=show_progress)
    return CombinedReport(weight, func, threshold)
