"""Forged ownership claims made from the public LoRA alone: what the strengthened R2 must reject.

A forger holds only the released file: per module ΔW = B′·A′ (rank r). Every forgery here is an exact factorisation
s·B̃·C̃·Ã = ΔW (so R1 passes to float precision) with passports that pass the pair checks of
:func:`seal_diffusion.core.passport.pair_problem` (not equal, not identity-like, |corr| ≤ 0.5) — the forger hides his
structure behind random invertible changes of basis P, Q (B̃ = B₀P, Ã = QA₀, C̃ = P⁻¹C₀Q⁻¹). They differ in how C̃_p
is invented:

* ``pad`` — rank raised to 2r; A₀ = [A′; 0], and C̃_p differs from C̃ only in the columns that meet A₀'s zero rows:
  B̃·(C̃ − C̃_p)·Ã = 0 exactly (null-space padding);
* ``nilpotent`` — rank 2r, B₀ = [B′ | B′K] has a kernel and C̃_p = C̃ + E with B̃·E = 0; Ã is full rank (B̃·E·Ã = 0
  without any zero row to give it away); ``noise`` adds a small random part so it is ≈ 0, not = 0;
* ``outside`` — rank 2r; C̃_p adds a small random adapter in directions ΔW does not use (a function-level
  difference with little harm to quality);
* ``flip`` — rank r; C̃_p is C̃ with the LoRA's weakest singular direction flipped (ΔW_p = ΔW − 2σ_r·u_r·v_rᵀ);
* ``optimised`` — rank r; C̃_p fitted by gradient descent on the subject's images with B̃, Ã fixed, from a random
  start (the reviewers' open question); with ``repel`` > 0 it is also pushed to differ from C̃ in the LoRA's
  directions (the adaptive forger, aiming at R2's own measures); with ``detect`` his key also detects the file
  (the dispute's R1).

The forgers are used by ``tests/test_dispute.py`` and ``benchmarks/bench_genuine.py`` (not by any command);
:func:`fit_passport_p` also serves the claim check's ambiguity attack (``attack ambiguity --mode optimised``).
"""

from __future__ import annotations

import os

import torch

from ..evaluation.heldout import heldout_batch, training_noise_scheduler
from ..core.keyfile import ModuleKey, SealKey
from ..formats.lora_file import read_lora
from ..core.passport import pair_problem
from ..core.network import network_from_key

MODES = ("pad", "nilpotent", "outside", "flip", "optimised")


def public_modules(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A′, B′)}`` (float64) from a public LoRA file in the diffusers layout (keys are module paths)."""
    lora = read_lora(path)
    if lora.layout != "diffusers":
        raise ValueError(f"{path}: forgers read the diffusers layout (module paths as keys)")
    return {m: (d.double(), u.double()) for m, (d, u) in lora.entries.items()}


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _disguise(b0, c0, cp0, a0, g, tries: int = 200):
    """Random invertible P, Q with an acceptable pair: (B₀P, P⁻¹C₀Q⁻¹, P⁻¹C₀_pQ⁻¹, QA₀)."""
    k = c0.shape[0]
    for _ in range(tries):
        p, q = _randn(g, k, k), _randn(g, k, k)
        pi, qi = torch.linalg.inv(p), torch.linalg.inv(q)
        c, cp = pi @ c0 @ qi, pi @ cp0 @ qi
        norm = float(c.std())  # passports of unit-ish scale, as a genuine key has
        c, cp = c / norm, cp / norm
        if pair_problem(c.float(), cp.float()) is None:
            return b0 @ p * norm, c, cp, q @ a0
    raise RuntimeError("no acceptable disguise found")


def _module(mode: str, a1, b1, g, noise: float, outside_scale: float):
    r = a1.shape[0]
    if mode == "pad":
        b0 = torch.cat([b1, _randn(g, b1.shape[0], r) * float(b1.std())], 1)
        a0 = torch.cat([a1, torch.zeros(r, a1.shape[1], dtype=a1.dtype)])
        c0 = torch.eye(2 * r, dtype=a1.dtype)
        cp0 = c0.clone()
        cp0[:, r:] = _randn(g, 2 * r, r) * 3.0  # only the columns that meet A₀'s zero rows
    elif mode == "nilpotent":
        kmat, w = _randn(g, r, r), _randn(g, r, r)
        b0 = torch.cat([b1, b1 @ kmat], 1)
        a0 = torch.cat([a1, _randn(g, r, a1.shape[1]) * float(a1.std())])
        c0 = torch.cat([torch.cat([torch.eye(r, dtype=a1.dtype), -kmat @ w], 1),
                        torch.cat([torch.zeros(r, r, dtype=a1.dtype), w], 1)])
        f = _randn(g, r, 2 * r) * 3.0
        e = torch.cat([-kmat @ f, f])  # [I | K]·E = 0, so B₀·E = 0
        cp0 = c0 + e + noise * _randn(g, 2 * r, 2 * r)
    elif mode == "outside":
        qb, _ = torch.linalg.qr(torch.cat([b1, _randn(g, b1.shape[0], r)], 1))
        qa, _ = torch.linalg.qr(torch.cat([a1.T, _randn(g, a1.shape[1], r)], 1))
        nb, na = qb[:, r:], qa[:, r:].T  # directions orthogonal to ΔW's column and row spaces
        scale = outside_scale * float(torch.linalg.matrix_norm(b1 @ a1)) / r ** 0.5
        b0 = torch.cat([b1, nb * scale ** 0.5], 1)
        a0 = torch.cat([a1, na * scale ** 0.5])
        c0 = torch.block_diag(torch.eye(r, dtype=a1.dtype), torch.zeros(r, r, dtype=a1.dtype))
        c0[r:, r:] = 1e-4 * torch.eye(r, dtype=a1.dtype)  # invertible, ~no effect
        cp0 = c0.clone()
        cp0[r:, r:] = _randn(g, r, r)
    elif mode == "flip":
        qb, rb = torch.linalg.qr(b1)
        qa, ra = torch.linalg.qr(a1.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        root = s.sqrt()
        b0, a0 = qb @ u * root, root[:, None] * (vh @ qa.T)  # ΔW = U√S · √S Vᵀ
        c0 = torch.eye(r, dtype=a1.dtype)
        cp0 = c0.clone()
        cp0[-1, -1] = -1.0  # the weakest direction
    else:
        raise ValueError(f"unknown forgery {mode!r}; expected one of {MODES}")
    return _disguise(b0, c0, cp0, a0, g)


def forge(public: dict[str, tuple[torch.Tensor, torch.Tensor]], mode: str, *, seed: int = 0, noise: float = 0.0,
          outside_scale: float = 0.3, base=None, data=None, prompt: str = "a photo of sks cat", steps: int = 60,
          lr: float = 1e-2, repel: float = 0.0, start: str = "random", base_model: str = "tiny",
          detect: bool = False) -> SealKey:
    """A forged key for the public ``{module: (A′, B′)}`` (see the module docstring). ``optimised`` needs
    ``base`` (a pipeline) and ``data`` (subject images); ``start`` is ``random`` (a fresh passport of C̃'s scale) or
    ``C`` (C̃ plus 10 % noise: perfect quality at the start, the adaptive forger's best bet with ``repel``).

    ``detect``: make the forged key also *detect* the file (the dispute's R1 asks for it): in every module whose
    contrast ⟨C̃, C̃ − C̃_p⟩ is negative, reflect C̃_p to 2C̃ − C̃_p. That flips the sign of C̃ − C̃_p and keeps R2's
    weight measures (‖B̃(C̃ − C̃_p)Ã‖, its spread) exactly; ΔW_p − ΔW changes sign, so to first order around a
    well-fitted ΔW the quality is kept too."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    rank_mode = "flip" if mode == "optimised" else mode
    for name, (a1, b1) in public.items():
        b, c, cp, a = _module(rank_mode, a1, b1, g, noise, outside_scale)
        modules[name] = ModuleKey(a.float().contiguous(), b.float().contiguous(), c.float().contiguous(),
                                  cp.float().contiguous())
    rank = next(iter(modules.values())).passport.shape[0]
    key = SealKey(modules, rank, float(rank), base_model, [], "forged")
    if mode == "optimised":
        key = _optimise(key, base, data, prompt, steps, lr, repel, seed, start)
    return _aim_at_detection(key) if detect else key


def _aim_at_detection(key: SealKey) -> SealKey:
    """``forge(..., detect=True)``: C̃_p → 2C̃ − C̃_p where ⟨C̃, C̃ − C̃_p⟩ < 0 (see :func:`forge`)."""
    modules = {}
    for n, mk in key.modules.items():
        c, cp = mk.passport, mk.passport_p
        flip = float((c * (c - cp)).sum()) < 0
        modules[n] = ModuleKey(mk.lora_A, mk.lora_B, c, (2 * c - cp).contiguous() if flip else cp)
    return SealKey(modules, key.rank, key.alpha, key.base_model, key.target_modules, key.passport_source)


def _optimise(key: SealKey, pipe, data, prompt, steps, lr, repel, seed, start="random") -> SealKey:
    """The ``optimised`` forger: C̃_p fitted from a random start of C̃'s scale (``start="C"``: C̃ plus 10 % of it)."""
    g = torch.Generator().manual_seed(seed + 1)
    init = {}
    for name, mk in key.modules.items():
        init[name] = torch.randn(key.rank, key.rank, generator=g) * float(mk.passport.std())
        if start == "C":
            init[name] = mk.passport + 0.1 * init[name]
    fitted = fit_passport_p(key, pipe, data, prompt, init, steps=steps, lr=lr, generator=g, repel=repel)
    modules = {n: ModuleKey(mk.lora_A, mk.lora_B, mk.passport, fitted[n]) for n, mk in key.modules.items()}
    return SealKey(modules, key.rank, key.alpha, key.base_model, key.target_modules, key.passport_source)


def fit_passport_p(key: SealKey, pipe, data, prompt: str, init: dict[str, torch.Tensor], *, steps: int, lr: float,
                   generator: torch.Generator, repel: float = 0.0) -> dict[str, torch.Tensor]:
    """``{module: C_p}`` fitted by Adam on the subject's denoising loss with B, A and C fixed, from ``init``; noise and
    timesteps are drawn from ``generator``. ``repel`` weights a term that rewards a large B(C − C_p)A relative to ΔW
    (capped at 1, so it cannot run away). The second-passport forgers of both this module and the claim check's
    ambiguity attack (:func:`seal_diffusion.ownership.claim.forge_passport_p`) fit through here."""
    latents, ehs = heldout_batch(pipe, data, prompt)
    net = network_from_key(key, pipe)
    scheduler = training_noise_scheduler(pipe)
    params = {}
    try:
        for name, layer in net.items():
            p = torch.nn.Parameter(init[name].clone())
            params[name] = p
            layer.passport_p = p  # the forger trains the second passport only
        for p in net.trainable_parameters():
            p.requires_grad_(False)
        grams = {n: (mk.lora_B.T @ mk.lora_B, mk.lora_A @ mk.lora_A.T) for n, mk in key.modules.items()} if repel else {}
        opt = torch.optim.Adam(params.values(), lr=lr)
        net.set_passport("C_p")
        cond = ehs.expand(latents.shape[0]).unet_kwargs()
        for _ in range(steps):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
            pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, **cond).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            if repel:
                ratios = []
                for n, p in params.items():
                    btb, aat = grams[n]
                    c = key.modules[n].passport
                    d = c - p
                    ratios.append(((btb @ d @ aat) * d).sum() / ((btb @ c @ aat) * c).sum())
                loss = loss - repel * torch.stack(ratios).clamp(max=1.0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        net.remove()
    return {n: p.detach().clone() for n, p in params.items()}
