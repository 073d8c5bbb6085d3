"""The robustness report: ``report.md``, ``report.json`` and five plots from the result of
:func:`seal_diffusion.reports.robustness.run_robustness` (the plots themselves are in :mod:`seal_diffusion.reports.plots`).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..fileio import json_safe, write_json_atomic, write_text_atomic
from .plots import plot_attacks, plot_finetune, plot_gamma, plot_innocents, plot_pruning


# -- the report ---------------------------------------------------------------------------------------------------------
def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write the five plots, report.md and report.json (NaN as null) to ``out_dir``; their paths by name."""
    files = {
        "attacks_plot": plot_attacks(report, out_dir / "attacks.png"),
        "prune_plot": plot_pruning(report, out_dir / "pruning.png"),
        "finetune_plot": plot_finetune(report, out_dir / "finetune.png"),
        "gamma_plot": plot_gamma(report, out_dir / "gamma.png"),
        "innocents_plot": plot_innocents(report, out_dir / "innocents.png"),
    }
    files["report_md"] = write_text_atomic(out_dir / "report.md", report_markdown(report))
    files["report_json"] = write_json_atomic(out_dir / "report.json", json_safe(report))
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


def _f(x, digits: int = 2) -> str:
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"



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

