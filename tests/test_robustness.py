"""The robustness report (``seal-diffusion robustness``): the quick attack matrix on a small owner run."""

import argparse
import json
import math

import pytest
import torch

from seal_diffusion.core.keyfile import SealKey
from seal_diffusion.cli.commands_attack import add_robustness_command
from seal_diffusion.reports.robustness import plan_for, run_robustness
from seal_diffusion.reports.robustness_measures import (
    _KeyGeometry,
    clopper_pearson_upper,
    relative_change,
    weighted_neg_log10_p,
)


@pytest.fixture(scope="module")
def owner_run(owner_training, subject_dir):
    return dict(key=owner_training["key_path"], lora=owner_training["lora_path"], data=subject_dir)


@pytest.fixture(scope="module")
def quick_report(owner_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust-report")
    calls = []
    report = run_robustness(owner_run["key"], owner_run["lora"], "tiny", owner_run["data"], out, quick=True,
                            progress=lambda done, total, label: calls.append((done, total, label)))
    return dict(report=report, out=out, calls=calls)


def _row(report, attack):
    return next(a for a in report["attacks"] if a["attack"] == attack)


def test_files_and_progress(quick_report):
    out = quick_report["out"]
    for name in ("report.md", "report.json", "attacks.png", "pruning.png", "finetune.png", "gamma.png",
                 "innocents.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["meta"]["quick"] is True and on_disk["release"]["detected"] is True
    md = (out / "report.md").read_text()
    for section in ("Pruning", "Fine-tuning", "Ambiguity", "Innocents"):
        assert section in md
    calls = quick_report["calls"]
    assert calls and calls[-1][0] == calls[-1][1], "the progress callback must reach its total"
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_obfuscations_leave_p_unchanged(quick_report):
    report = quick_report["report"]
    ref = report["release"]["neg_log10_p"]
    obf = [a for a in report["attacks"] if a["group"] == "obfuscation"]
    assert {a["attack"] for a in obf} == {"rescale", "permute", "mix", "pad-rank", "refactor-svd"}
    for a in obf:
        assert a["neg_log10_p"] == pytest.approx(ref, rel=1e-6), a["attack"]
        assert a["unchanged"] and a["detected"]


def test_damaging_attacks(quick_report):
    report = quick_report["report"]
    assert _row(report, "prune factors 0.9")["detected"]
    assert _row(report, "prune delta 0.9")["detected"]
    for dtype in ("fp16", "bf16", "int8"):
        assert _row(report, f"quantize {dtype}")["detected"]
    assert _row(report, "merge-checkpoint (diffusers folder, verified with --base)")["detected"]
    assert any(a["group"] == "merge" and a["attack"].startswith("merge-lora") and a["detected"]
               for a in report["attacks"])
    # fidelity of pruning: 90 % pruning of the factors costs some of the release's improvement over the base
    pf = _row(report, "prune factors 0.9")
    assert pf["loss"] > report["meta"]["release_loss"] and pf["retained"] < 1.0
    # the plain-LoRA evaluation of the release equals the SEAL network with C (same ΔW), and the base equals "off"
    ref = report["claim_reference"]
    assert report["meta"]["release_loss"] == pytest.approx(ref["loss_C"], rel=1e-4)
    assert report["meta"]["base_loss"] == pytest.approx(ref["loss_off"], rel=1e-6)
    ft = report["finetune"][0]["points"]
    assert [p["steps"] for p in ft] == [0, 8] and ft[0]["detected"] and ft[1]["detected"]
    assert ft[1]["median_rel_change"] > 0 and len(ft[1]["per_module"]) == report["meta"]["n_modules"]


def test_innocents_not_detected(quick_report):
    inn = quick_report["report"]["innocents"]
    assert inn["n"] >= 200
    assert inn["by_kind"]["decoy key"]["n"] >= 100 and inn["by_kind"]["random LoRA"]["n"] >= 100
    for stat in ("neg_log10_p", "weighted_pair", "weighted_subspace"):
        assert inn[stat]["false_positives"] / inn["n"] <= 0.01, stat
    assert inn["neg_log10_p"]["upper_95"] == pytest.approx(clopper_pearson_upper(0, inn["n"]))


def test_claims(quick_report):
    report = quick_report["report"]
    g0 = next(g for g in report["gamma"] if g["gamma"] == 0.0)
    assert g0["accepted"] and g0["loss_gap"] < 0.25
    g1 = next(g for g in report["gamma"] if g["gamma"] == 1.0)
    assert not g1["accepted"] and not g1["checks"]["R2 fidelity"]
    assert {f["mode"] for f in report["forgeries"]} == {"random", "identity", "optimised"}
    assert not any(f["accepted"] for f in report["forgeries"])
    assert report["gamma_threshold"] == 1.0


def test_factor_algebra_matches_dense(owner_run):
    """Relative change and the subspace residual from factors agree with the dense ΔW computation."""
    key = SealKey.load(owner_run["key"])
    g = torch.Generator().manual_seed(0)
    name, mk = next(iter(key.modules.items()))
    d0, u0 = mk.passport @ mk.lora_A, mk.lora_B * key.scale
    d1, u1 = d0 + 0.1 * torch.randn(d0.shape, generator=g), u0 + 0.1 * torch.randn(u0.shape, generator=g)
    dense = float((u1 @ d1 - u0 @ d0).norm() / (u0 @ d0).norm())
    assert relative_change({name: (d1, u1)}, {name: (d0, u0)})[name] == pytest.approx(dense, rel=1e-5)
    meas = _KeyGeometry(key).measures({name: (d1, u1)})[name]
    b, a = mk.lora_B.double(), mk.lora_A.double()
    w = u1.double() @ d1.double()
    proj = b @ torch.linalg.pinv(b) @ w @ torch.linalg.pinv(a) @ a
    assert meas["subspace"] == pytest.approx(float((w - proj).norm() / w.norm()), rel=1e-5)
    assert meas["pair"] == pytest.approx(dense, rel=1e-5)  # the C-term is the minimum for a perturbed copy


def test_weighted_statistic_is_swap_symmetric(owner_run):
    """Swapping C and C_p in every module flips every d_m and leaves the weights: the weighted p of the swapped key
    is the p of −Σ w d, i.e. the weights do not depend on which passport was released."""
    from seal_diffusion.core.keyfile import ModuleKey
    from seal_diffusion.formats.lora_file import read_lora
    from seal_diffusion.detection.verify import Suspect, verify

    key = SealKey.load(owner_run["key"])
    swapped = SealKey({n: ModuleKey(mk.lora_A, mk.lora_B, mk.passport_p, mk.passport) for n, mk in key.modules.items()},
                      key.rank, key.alpha)
    lora = read_lora(owner_run["lora"])
    s = Suspect("x", lora.layout, factors=lora.by_module(key.modules))
    m1, m2 = _KeyGeometry(key).measures(s.factors), _KeyGeometry(swapped).measures(s.factors)
    for n in m1:
        assert m1[n]["pair"] == pytest.approx(m2[n]["pair"]) and m1[n]["subspace"] == pytest.approx(m2[n]["subspace"])
    r1, r2 = verify(key, s), verify(swapped, s)
    assert all(a.stat == pytest.approx(-b.stat) for a, b in zip(r1.per_module, r2.per_module))
    assert weighted_neg_log10_p(r1, m1, "pair") > 10 and weighted_neg_log10_p(r2, m2, "pair") == 0.0


def test_cli_parser_and_plans():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_robustness_command(sub)
    args = parser.parse_args(["robustness", "--key", "k.sealkey", "--lora", "l.safetensors", "--base", "tiny",
                              "--data", "d", "--out", "o", "--quick", "--finetune-lr", "5e-5", "2e-3"])
    assert args.quick and args.finetune_lr == [5e-5, 2e-3] and callable(args.func)
    quick, full = plan_for(True), plan_for(False)
    assert quick.n_decoys + quick.n_random >= 200 and full.n_decoys + full.n_random >= 200
    assert 0.9 in quick.prune_ratios and 0.0 in quick.gammas and 1.0 in quick.gammas
    assert len(full.prune_ratios) > len(quick.prune_ratios) and full.n_trained_innocents > 0
    assert plan_for(False, finetune_steps=[10, 5]).finetune_steps == (0, 5, 10)
    assert clopper_pearson_upper(0, 200) == pytest.approx(1 - 0.05 ** (1 / 200))
    assert math.isclose(clopper_pearson_upper(200, 200), 1.0)
