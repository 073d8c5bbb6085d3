"""The app's figures (presentation only): the per-layer evidence chart of Verify and the recovered passport image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seal_diffusion.core.passport import correlation
from seal_diffusion.reports.plots import _pyplot


def _mpl_text(text: str) -> str:
    """A file name as plain matplotlib text (a '$' would start math mode)."""
    return text.replace("$", r"\$")


def _verify_chart(items, threshold: float, path: Path) -> Path:
    """Per file: the pooled evidence against the threshold (left) and the evidence of every layer (right)."""
    plt = _pyplot()
    height = 2.7 * len(items) + 0.5
    fig, axes = plt.subplots(len(items), 2, figsize=(9, height), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [1, 5]})
    for (label, rep), (ax0, ax1) in zip(items, axes):
        color = "#16a34a" if rep.detected else "#dc2626"
        ax0.bar([0], [rep.neg_log10_p], color=color, width=0.6)
        ax0.axhline(threshold, color="black", linestyle="--", linewidth=1)
        ax0.set_xticks([0], ["whole file"])
        ax0.set_ylabel("evidence (−log10 p)")
        ax0.set_ylim(0, max(rep.neg_log10_p, threshold) * 1.25)
        ax0.text(0, rep.neg_log10_p, f"{rep.neg_log10_p:,.1f}", ha="center", va="bottom", fontsize=8)
        vals = [m.neg_log10_p for m in rep.per_module]
        ax1.bar(range(1, len(vals) + 1), vals, color="#6b8fd6", width=0.85)
        ax1.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax1.set_xlim(0.3, len(vals) + 0.7)
        ax1.set_xlabel(f"each adapted layer of the model (1…{len(vals)})")
        found = "watermark found" if rep.detected else "no watermark found"
        ax1.set_title(f"{_mpl_text(label)}: {found}. Bars: the evidence of each layer", fontsize=9, color=color)
        ax1.legend(fontsize=8, loc="upper right")
        for ax in (ax0, ax1):
            ax.grid(axis="y", alpha=0.3)
            ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))  # the top band stays free for the app's image label
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _passport_figure(key, items, path: Path) -> Path:
    """The image hidden as passport C next to what each suspect holds (Ĉ averaged over the layers of that frame)."""
    names = list(key.modules)
    first = key.modules[names[0]].passport
    frame = [m for m in names if torch.equal(key.modules[m].passport, first)]  # the layers that hold frame 0
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(items) + 1, figsize=(2.6 * (len(items) + 1), 3.4), dpi=100, squeeze=False)

    def show(ax, mat, title):
        arr = mat.double().numpy()
        lo, hi = np.percentile(arr, [2, 98])
        ax.imshow(arr, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8)

    show(axes[0][0], first, "hidden in your key")
    for ax, (label, rec) in zip(axes[0][1:], items):
        mats = [rec[m] for m in frame if m in rec]
        if not mats:
            ax.axis("off")
            ax.set_title(f"{label}\n(no matching layers)", fontsize=8)
            continue
        avg = torch.stack([m.double() for m in mats]).mean(0)
        short = _mpl_text(label if len(label) <= 28 else label[:25] + "…")
        show(ax, avg, f"found in {short}\nmatch {correlation(avg, first):.2f}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / 3.4))  # the top band stays free for the app's image label
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
