"""The claim check (the paper's V) and the ambiguity attack that tries to fool it.

An ownership claim is a key (B, A, C, C_p). It is accepted only if all of these hold:

* **passports**: C and C_p are an acceptable pair in every module — not identical, not identity-like, not strongly
  correlated (:func:`seal_diffusion.core.passport.pair_problem`). This closes the known hole C = C_p = I;
* **commitment** (when the owner published one before release): the key hashes to it;
* **R1, reproduction**: B·C·A reproduces the suspect, relative error ≤ ``tol``;
* **R2, fidelity**: C_p works as well as C on the subject. With fixed noise and timesteps, the held-out denoising
  loss gap ``g = (L(C_p) − L(C)) / (L(base) − L(C))`` — the share of the improvement over the base model that C_p
  loses — is ≤ ``max_gap``, and images from fixed seeds with C_p resemble those with C (SSIM ≥ ``min_ssim``).

Only the real owner, whose weights were trained with both passports, passes R2 with a second passport; a forger who
holds only the release can reproduce it (R1) with an invented C but has no C_p that works.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.base_model import load_pipeline
from ..errors import UserError
from ..evaluation.heldout import heldout_batch, heldout_denoising_loss
from .forgery import fit_passport_p
from .genuine import base_fingerprint, data_fingerprint
from ..core.keyfile import ModuleKey, SealKey
from ..evaluation.metrics import mean_std, psnr, ssim
from ..core.passport import make_passports, pair_problem
from ..core.network import network_from_key
from ..evaluation.render import default_size, generate
from ..detection.verify import load_suspect, passport_std, verify

DEFAULT_MAX_GAP = 0.25
DEFAULT_MIN_SSIM = 0.8
DEFAULT_TOL = 1e-3


@dataclass
class ClaimCheck:
    name: str
    passed: bool
    detail: str


@dataclass
class ClaimReport:
    accepted: bool
    checks: list[ClaimCheck] = field(default_factory=list)
    measurements: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"accepted": self.accepted, "checks": [asdict(c) for c in self.checks], "measurements": self.measurements}

    def summary(self) -> str:
        lines = [f"claim {'ACCEPTED' if self.accepted else 'REJECTED'}"]
        lines += [f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


# fidelity_measurements' pieces within one process, each by what it depends on: a loss or an image batch with one
# passport depends on (A, B, that passport), the base's weights, the subject images and the settings (the images also
# on the pipeline's scheduler) — not on the other passport. So checking a second claim with the same key measures
# nothing again, and a claim that differs only in C_p (a forged second passport) measures only C_p. The base counts by
# its weights' fingerprint (as genuine.function_measures).
_FIDELITY: dict[tuple, object] = {}
_FIDELITY_MAX = 64
_LOSS_MODES = ("C", "C_p", "identity", "off")


def _mode_fingerprint(key: SealKey, mode: str) -> str:
    """SHA-256 of the weights a network built from ``key`` runs with in ``mode`` (``off``: none)."""
    if mode == "off":
        return "off"
    h = hashlib.sha256(repr((key.rank, key.scale)).encode())
    eye = torch.eye(key.rank)
    for name in sorted(key.modules):
        mk = key.modules[name]
        passport = {"C": mk.passport, "C_p": mk.passport_p}.get(mode, eye)
        h.update(name.encode())
        for t in (mk.lora_A, mk.lora_B, passport):
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def fidelity_measurements(key: SealKey, base, data: str | os.PathLike, prompt: str, *, seeds=(0, 1, 2, 3),
                          steps: int = 10, config=None) -> dict:
    """Held-out denoising loss for C, C_p, ∅ and the base, and SSIM/PSNR of C_p vs C images from fixed seeds.

    Each loss and image batch is measured once per process for the same weights, base, images and settings (above).
    """
    pipe = base if not isinstance(base, (str, os.PathLike)) else load_pipeline(base, config=config)
    common = (base_fingerprint(base, config), data_fingerprint(data), prompt)
    sampler = (type(pipe.scheduler).__name__, repr(sorted(dict(pipe.scheduler.config).items())), tuple(seeds), steps)
    memo = {("loss", m): ("loss", _mode_fingerprint(key, m)) + common for m in _LOSS_MODES}
    memo.update({("images", m): ("images", _mode_fingerprint(key, m)) + common + sampler for m in ("C", "C_p")})
    missing = [wm for wm, m in memo.items() if m not in _FIDELITY]
    if missing:
        net = network_from_key(key, pipe)
        try:
            if any(what == "loss" for what, _ in missing):
                latents, ehs = heldout_batch(pipe, data, prompt)
            size = default_size(pipe)
            jobs = [(prompt, s) for s in seeds]
            for what, mode in missing:
                if memo[what, mode] in _FIDELITY:  # e.g. C = C_p: the same weights, measured a moment ago
                    continue
                if what == "loss":
                    value = heldout_denoising_loss(pipe.unet, net, latents, ehs, mode)
                else:
                    with net.passport(mode):
                        value = generate(pipe, jobs, steps=steps, guidance_scale=1.0, height=size, width=size)
                if len(_FIDELITY) >= _FIDELITY_MAX:
                    _FIDELITY.pop(next(iter(_FIDELITY)))
                _FIDELITY[memo[what, mode]] = value
        finally:
            net.remove()
    losses = {m: _FIDELITY[memo["loss", m]] for m in _LOSS_MODES}
    img_c, img_p = _FIDELITY[memo["images", "C"]], _FIDELITY[memo["images", "C_p"]]
    improvement = losses["off"] - losses["C"]
    gap = (losses["C_p"] - losses["C"]) / improvement if improvement > 1e-12 else float("inf")
    return {
        "loss": losses,
        "loss_gap": gap,
        "ssim_C_Cp": mean_std(ssim(img_c, img_p))[0],
        "psnr_C_Cp": mean_std(psnr(img_c, img_p))[0],
    }


def check_claim(
    key: SealKey | str | os.PathLike,
    suspect: str | os.PathLike,
    *,
    base="tiny",
    data: str | os.PathLike | None = None,
    prompt: str = "a photo of sks cat",
    commitment: str | None = None,
    tol: float = DEFAULT_TOL,
    max_gap: float = DEFAULT_MAX_GAP,
    min_ssim: float = DEFAULT_MIN_SSIM,
    config=None,
) -> ClaimReport:
    """Check an ownership claim against a suspect LoRA (see the module docstring). ``data``: subject images."""
    key = key if isinstance(key, SealKey) else SealKey.load(key)
    checks: list[ClaimCheck] = []
    problems = [(n, pair_problem(mk.passport, mk.passport_p)) for n, mk in key.modules.items()]
    problems = [(n, p) for n, p in problems if p]
    checks.append(ClaimCheck("passports", not problems,
                             f"{len(problems)} module(s) with a bad pair, e.g. {problems[0][0]}: {problems[0][1]}"
                             if problems else f"{len(key.modules)} acceptable (C, C_p) pairs"))
    if commitment is not None:
        ok = key.commitment() == commitment.strip().lower()
        checks.append(ClaimCheck("commitment", ok, "matches the published hash" if ok else
                                 "does not match the published hash: this is not the key committed before release"))
    report = verify(key, load_suspect(suspect, key, base if isinstance(base, str) else None, config=config))
    err = report.reconstruction_error if report.reconstruction_error is not None else float("inf")
    complete = report.n_modules_missing == 0
    checks.append(ClaimCheck("R1 reproduction", err <= tol and complete,
                             f"relative error {err:.2e} (tolerance {tol:g}); {report.n_modules_missing} modules missing"))
    measurements: dict = {"reconstruction_error": err, "neg_log10_p": report.neg_log10_p}
    if data is None:
        checks.append(ClaimCheck("R2 fidelity", False, "no subject images given (--data): fidelity not shown"))
    else:
        fid = fidelity_measurements(key, base, data, prompt, config=config)
        measurements.update(fid)
        ok_gap = fid["loss_gap"] <= max_gap
        ok_img = fid["ssim_C_Cp"] >= min_ssim
        checks.append(ClaimCheck(
            "R2 fidelity", ok_gap and ok_img,
            f"C_p loses {fid['loss_gap']:.1%} of C's improvement over the base (max {max_gap:.0%}); "
            f"SSIM C vs C_p images {fid['ssim_C_Cp']:.3f} (min {min_ssim})"))
    return ClaimReport(all(c.passed for c in checks), checks, measurements)


# -- the ambiguity attack: forge a second passport ------------------------------------------------------------------
def _with_passport_p(key: SealKey, new_p: dict[str, torch.Tensor]) -> SealKey:
    modules = {n: ModuleKey(mk.lora_A, mk.lora_B, mk.passport, new_p[n].float()) for n, mk in key.modules.items()}
    return SealKey(modules, key.rank, key.alpha, key.base_model, key.target_modules, key.passport_source,
                   architecture=key.architecture)


def forge_passport_p(key: SealKey, mode: str = "gamma", gamma: float = 0.5, seed: int = 0, *, base=None,
                     data=None, prompt: str = "a photo of sks cat", steps: int = 100) -> SealKey:
    """A forged claim: the key with C_p replaced.

    * ``gamma``: (1−γ)·C_p + γ·R with R random of the same σ (γ = 0 is the real C_p; the paper's Fig. 4);
    * ``random``: a fresh random passport; ``identity``: σ·I (the trivial hole);
    * ``optimised``: C_p learned by gradient descent on the subject's denoising loss with B, A and C fixed.
    """
    sigma = passport_std(key)
    names = list(key.modules)
    fresh = {n: p[1] for n, p in make_passports(names, key.rank, f"forgery {seed}", std=sigma).items()}
    if mode == "gamma":
        if not 0 <= gamma <= 1:
            raise UserError(f"--gamma {gamma}: must be in [0, 1]")
        new_p = {n: (1 - gamma) * key.modules[n].passport_p + gamma * fresh[n] for n in names}
    elif mode == "random":
        new_p = fresh
    elif mode == "identity":
        new_p = {n: torch.eye(key.rank) * sigma for n in names}
    elif mode == "optimised":
        new_p = _optimise_passport_p(key, fresh, base, data, prompt, steps, seed)
    else:
        raise UserError(f"--mode {mode!r}: expected gamma, random, identity or optimised")
    return _with_passport_p(key, new_p)


def _optimise_passport_p(key, init, base, data, prompt, steps, seed):
    if data is None:
        raise UserError("ambiguity --mode optimised needs --data (subject images)")
    pipe = load_pipeline(base or key.base_model)
    return fit_passport_p(key, pipe, data, prompt, init, steps=steps, lr=1e-2,
                          generator=torch.Generator().manual_seed(seed))


def forge_key(key_path, out, *, mode="gamma", gamma=0.5, seed=0, data=None, base=None, steps=100,
              overwrite=False) -> Path:
    """CLI ``attack ambiguity KEY OUT``: write the forged claim as a key file (its commitment is its own)."""
    forged = forge_passport_p(SealKey.load(key_path), mode, gamma, seed, base=base, data=data, steps=steps)
    return forged.save(out, force=overwrite)
