"""Figures: singular-value spectra of ΔW (SEAL paper Fig. 2/6), recovered passports (Fig. 8), the σ sweep (Table 16).

All plots use matplotlib's Agg backend (no display needed) and write a PNG. Also the five plots of the robustness
report (attacks, pruning — Fig. 3, fine-tuning, γ — Fig. 4, innocents).

**Spectra without ΔW.** A LoRA stores ΔW = U·D with U (out×r) and D (r×in). Its non-zero singular values are those of a
tiny r×r matrix: with QR decompositions U = Q_U R_U and Dᵀ = Q_D R_D, ΔW = Q_U (R_U R_Dᵀ) Q_Dᵀ and Q_U, Q_D have
orthonormal columns, so σ(ΔW) = σ(R_U R_Dᵀ). Cost O((out+in)·r²) instead of forming an out×in matrix — it matters for
SD 1.5 (1280×1280 per layer, 128 layers) and is exact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..ownership.claim import DEFAULT_MAX_GAP, DEFAULT_MIN_SSIM
from ..core.passport import correlation

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (down r×in, up out×r)}, ΔW = up @ down


def _pyplot():
    import matplotlib  # lazy: matplotlib costs ~1 s to import and only the plotting paths need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def delta_singular_values(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64, length r) of ΔW = up @ down, via QR of the factors (ΔW never formed)."""
    _, r_u = torch.linalg.qr(up.double())  # up = Q_U R_U, R_U r×r
    _, r_d = torch.linalg.qr(down.double().T)  # downᵀ = Q_D R_D
    return torch.linalg.svdvals(r_u @ r_d.T)


def spectra(factors: Factors) -> dict[str, np.ndarray]:
    """``{module: singular values of ΔW}`` for every module of a LoRA's factors."""
    return {name: delta_singular_values(down, up).numpy() for name, (down, up) in factors.items()}


def plot_spectra(loras: Mapping[str, Factors], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """−log σ_i of ΔW for every module of every LoRA (thin lines) and their median (thick), one colour per LoRA.

    ``loras`` maps a label (e.g. "LoRA", "SEAL (released)") to its factors ``{module: (down, up)}`` (a
    :class:`~seal_diffusion.detection.verify.Suspect`'s ``factors``, or :func:`~seal_diffusion.core.export.public_factors`). The
    paper's point (Fig. 2/6): a SEAL release has the same kind of spectrum as a plain LoRA, nothing stands out.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, factors) in enumerate(loras.items()):
        color = colors[k % len(colors)]
        values = [-np.log(np.maximum(s, 1e-300)) for s in spectra(factors).values()]
        r = max(len(v) for v in values)
        for v in values:
            ax.plot(np.arange(1, len(v) + 1), v, color=color, alpha=0.15, linewidth=0.8)
        padded = np.full((len(values), r), np.nan)
        for i, v in enumerate(values):
            padded[i, : len(v)] = v
        ax.plot(np.arange(1, r + 1), np.nanmedian(padded, axis=0), color=color, linewidth=2.2,
                label=f"{label} (median of {len(values)} modules)")
    from matplotlib.ticker import MaxNLocator  # lazy, as in _pyplot

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i (singular values in decreasing order)")
    ax.set_ylabel("−log σ_i of ΔW")
    ax.set_title(title or "Singular-value spectra of ΔW")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_passports(
    key,
    recovered: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    modules: Sequence[str] | None = None,
    n_modules: int = 3,
) -> Path:
    """The real passports C, C_p of a few modules next to passports recovered from suspects (paper Fig. 8).

    ``recovered`` maps a label (e.g. "release", "pruned 90 %") to ``{module: Ĉ}`` from
    :func:`seal_diffusion.detection.verify.recover_passports`. Each row is one module, drawn with one colour scale (that of C);
    each recovered panel is titled with its correlation with C and with C_p.
    """
    plt = _pyplot()
    modules = list(modules) if modules else list(key.modules)[:n_modules]
    cols = ["C (secret)", "C_p (second passport)"] + [f"recovered: {label}" for label in recovered]
    fig, axes = plt.subplots(len(modules), len(cols), figsize=(2.3 * len(cols), 2.4 * len(modules) + 0.4), dpi=110,
                             squeeze=False)
    for i, name in enumerate(modules):
        mk = key.modules[name]
        lim = float(mk.passport.abs().max())
        panels = [(mk.passport, cols[0]), (mk.passport_p, cols[1])]
        for label in recovered:
            c_hat = recovered[label].get(name)
            title = f"{cols[len(panels)]}\nmissing" if c_hat is None else (
                f"{cols[len(panels)]}\ncorr C {correlation(c_hat, mk.passport):.2f}, "
                f"C_p {correlation(c_hat, mk.passport_p):.2f}")
            panels.append((c_hat, title))
        for j, (mat, title) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if mat is not None:
                ax.imshow(mat.double().numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(title, fontsize=7)
        short = name if len(name) <= 40 else "…" + name[-39:]
        axes[i][0].set_ylabel(short, fontsize=6)
    fig.suptitle("Passports: real vs recovered from the suspect (Ĉ = pinv(B)·ΔŴ·pinv(A))", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_sigma_sweep(rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """SSIM and PSNR of N(B,A,∅) vs the base model against the passport scale σ (log axis), paper values for SSIM."""
    plt = _pyplot()
    sig = np.array([r["sigma"] for r in rows], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    a1.errorbar(sig, [r["ssim_identity_vs_base"] for r in rows], yerr=[r["ssim_identity_vs_base_std"] for r in rows],
                marker="o", capsize=3, label="N(B,A,∅) vs base (this run)")
    a1.plot(sig, [r["ssim_C_vs_base"] for r in rows], marker="s", linestyle=":", label="C vs base (this run)")
    paper = {0.01: 0.10, 0.1: 0.65, 1.0: 0.94, 10.0: 0.99, 100.0: 0.998}
    ps = [s for s in sig if s in paper]
    if ps:
        a1.plot(ps, [paper[s] for s in ps], marker="x", linestyle="--", color="gray", label="paper (SD 1.5)")
    a1.set_xscale("log")
    a1.set_xlabel("passport std σ")
    a1.set_ylabel("SSIM")
    a1.set_ylim(min(0.0, a1.get_ylim()[0]), 1.02)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=7)
    psnr = np.array([r["psnr_identity_vs_base"] for r in rows], dtype=float)
    a2.plot(sig, np.where(np.isfinite(psnr), psnr, np.nan), marker="o")
    a2.set_xscale("log")
    a2.set_xlabel("passport std σ")
    a2.set_ylabel("PSNR N(B,A,∅) vs base (dB)")
    a2.grid(alpha=0.3)
    fig.suptitle("Passport scale vs fidelity of the passport-less model (SEAL Table 16)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# -- the robustness report (seal-diffusion robustness) ------------------------------------------------------------------
def _threshold_line(ax, thr: float) -> None:
    ax.axhline(thr, color="crimson", linestyle="--", linewidth=1, label=f"threshold {thr}")


def plot_attacks(r: dict, path) -> Path:
    """−log10 p per attack (horizontal bars) with the detection threshold."""
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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



def _save(fig, path) -> Path:
    plt = _pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
