"""The function-level test (``verify --functional``): exact under H0, finds the release and a distilled copy, keeps
its owner-side cache private and bound to the key and base; ``attack distill``."""

import json
import math
import os
import shutil

import pytest
import torch

from seal_diffusion.detection import functional as F
from seal_diffusion.detection import probe_cache as PC
from seal_diffusion.detection import probes as P
from seal_diffusion.core.keyfile import ModuleKey, SealKey
from seal_diffusion.detection.verify import sign_flip_neg_log10_p

N_PROBES = 4
SIZE = 16  # probe latent side: half the tiny default's, 4× cheaper (the CLI's --probe-size)


@pytest.fixture(scope="module")
def fx(owner_training, tmp_path_factory):
    """The owner's key copied to a private folder (its cache lands there), the release, and the probes/directions."""
    from seal_diffusion.models.base_model import load_pipeline

    d = tmp_path_factory.mktemp("functional")
    key_path = shutil.copy(owner_training["key_path"], d / "cat.sealkey")
    shutil.copy(os.path.join(owner_training["output_dir"], "README.md"), d / "README.md")
    key = SealKey.load(key_path)
    pipe = load_pipeline("tiny")
    cache = PC.owner_cache(key, pipe, key_path=key_path, n_probes=N_PROBES, size=SIZE)
    return dict(dir=d, key_path=str(key_path), key=key, pipe=pipe, cache=cache, lora=owner_training["lora_path"])


def _outputs(fx, lora):
    originals = P.merge_lora_into(fx["pipe"].unet, lora)
    try:
        return P.suspect_outputs(fx["pipe"].unet, fx["cache"].probes)
    finally:
        P.restore_weights(fx["pipe"].unet, originals)


def test_probes_are_secret_coin_symmetric_and_use_the_instance_prompt(fx):
    key, cache = fx["key"], fx["cache"]
    assert cache.probes.prompts[0] == "a photo of sks cat"  # read from the model card beside the key
    swapped = SealKey({n: ModuleKey(m.lora_A, m.lora_B, m.passport_p, m.passport) for n, m in key.modules.items()},
                      key.rank, key.alpha)
    assert P.probe_secret(swapped) == P.probe_secret(key), "the probes must not depend on the release coin"
    assert P.probe_secret(key) != hashlib_commitment(key), "the probe seed is not the public commitment"


def hashlib_commitment(key):
    return bytes.fromhex(key.commitment())


def test_release_reaches_far_beyond_the_threshold(fx):
    rep = F.functional_test(fx["cache"], _outputs(fx, fx["lora"]))
    assert rep.neg_log10_p >= 10, rep.neg_log10_p
    # ≥ 40 of 48 layers on the release's side: under fair coins that alone has p ≈ 2e-6
    assert rep.n_positive >= 40 and rep.n_modules == 48 and rep.n_probes == N_PROBES


def test_null_is_exact_over_coin_flips_and_real_decoy_keys(fx):
    """H0 by construction: flipping the coins of the directions is exactly a suspect that does not know them; the
    statistic is equivariant (d → E·d), so its p-values are those of fair coins. Then real decoy keys (same A, B,
    fresh C, C_p): new probes, new directions, the owner's release is an innocent for them."""
    cache = fx["cache"]
    f_rel = _outputs(fx, fx["lora"])
    d0 = F.module_stats(cache, f_rel)
    gen = torch.Generator().manual_seed(0)
    nlps = []
    for i in range(60):
        e = torch.randint(0, 2, (cache.n_modules,), generator=gen).double() * 2 - 1
        flipped = PC.OwnerCache(cache.probes, cache.f_mid, cache.directions * e.float().view(-1, 1, 1, 1, 1),
                                cache.modules, cache.h, cache.commitment, cache.base)
        d = F.module_stats(flipped, f_rel)
        assert torch.allclose(d, e * d0, rtol=1e-6, atol=1e-9 * float(d0.abs().max()))
        nlps.append(sign_flip_neg_log10_p(d.tolist()))
    assert sum(x >= 3.3 for x in nlps) == 0
    assert sum(x >= 1.0 for x in nlps) <= 17  # p ≤ 0.1: 6 expected of 60; binomial 99.99 % bound
    assert sum(x >= math.log10(2) for x in nlps) >= 12  # p ≤ 0.5 about half the time: not a test that never fires

    key = fx["key"]
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        sigma = float(torch.cat([m.passport.flatten() for m in key.modules.values()]).std())
        decoy = SealKey({n: ModuleKey(m.lora_A, m.lora_B, torch.randn(m.passport.shape, generator=g) * sigma,
                                      torch.randn(m.passport.shape, generator=g) * sigma)
                         for n, m in key.modules.items()}, key.rank, key.alpha)
        dc = PC.owner_cache(decoy, fx["pipe"], n_probes=2, prompts=cache.probes.prompts[:1] + list(P.GENERIC_PROMPTS),
                            size=SIZE)
        rep = F.functional_test(dc, _outputs_for(fx, dc))
        assert not rep.detected, rep.neg_log10_p


def _outputs_for(fx, cache):
    originals = P.merge_lora_into(fx["pipe"].unet, fx["lora"])
    try:
        return P.suspect_outputs(fx["pipe"].unet, cache.probes)
    finally:
        P.restore_weights(fx["pipe"].unet, originals)


def _train(out, subject_dir, *extra):
    from seal_diffusion.training import parse_args, train

    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject_dir),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(out), "--output_name", "x",
                       "--rank", "4", "--learning_rate", "2e-3", "--cache_latents", "--resolution", "32", *extra])
    result = train(args)
    result["network"].remove()
    return result["lora_path"]


@pytest.mark.parametrize("kind", ["plain LoRA, the owner's seed", "SEAL LoRA, another key"])
def test_same_subject_innocents_are_not_accused(fx, subject_dir, tmp_path, kind):
    if kind.startswith("plain"):  # the owner's seed, data and settings, without passports (fewer steps)
        lora = _train(tmp_path, subject_dir, "--method", "lora", "--max_train_steps", "20", "--seed", "0")
    else:
        lora = _train(tmp_path, subject_dir, "--max_train_steps", "15", "--seed", "1", "--secret", "another key")
    rep = F.functional_test(fx["cache"], _outputs(fx, lora))
    assert not rep.detected, (kind, rep.neg_log10_p, rep.n_positive)


def test_distilled_copy_escapes_the_weight_test_but_not_the_function_test(fx, distilled_copy, tmp_path, capsys):
    """``attack distill`` (conftest: short, small latents, 150 steps) then ``verify --functional`` from the CLI,
    twice: the second run reads the private cache."""
    from seal_diffusion.cli import main

    assert distilled_copy["fidelity"] > 0.5, distilled_copy["fidelity"]
    fp = PC.base_fingerprint(fx["pipe"].unet)
    cache_file = PC.cache_path(fx["key_path"], fp)
    assert cache_file.is_file() and (cache_file.stat().st_mode & 0o777) == 0o600
    mtime = cache_file.stat().st_mtime_ns
    out = tmp_path / "report.json"
    rc = main(["verify", "--key", fx["key_path"], distilled_copy["path"], "--base", "tiny", "--functional",
               "--probes", str(N_PROBES), "--probe-size", str(SIZE), "--json", str(out)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert rc == 0 and r["detected"] is True, printed
    # distillation leaves the weight test little (here < 3.3; longer runs sometimes keep a trace) …
    assert r["functional"]["detected"] is True and r["functional"]["n_probes"] == N_PROBES  # … and this test finds it
    assert r["functional"]["neg_log10_p"] > r["weight"]["neg_log10_p"] + 3
    assert set(r["functional"]) >= {"neg_log10_p", "detected", "n_probes", "n_modules", "n_positive"}
    assert r["neg_log10_p"] == pytest.approx(max(0.0, max(r["weight"]["neg_log10_p"],
                                                          r["functional"]["neg_log10_p"]) - math.log10(2)))
    assert "function test" in printed
    assert cache_file.stat().st_mtime_ns == mtime, "a matching cache must be reused, not recomputed"


def test_cache_is_bound_to_key_and_base_and_never_public(fx, tmp_path):
    cache = fx["cache"]
    fp = PC.base_fingerprint(fx["pipe"].unet)
    path = PC.cache_path(fx["key_path"], fp)
    settings = PC._settings(N_PROBES, P.probe_prompts("a photo of sks cat"), P.DEFAULT_H, SIZE)
    assert PC.load_cache(path, cache.commitment, fp, settings) is not None
    assert PC.load_cache(path, "0" * 64, fp, settings) is None  # another key (commitment) → recompute
    assert PC.load_cache(path, cache.commitment, "f" * 64, settings) is None  # another base → recompute
    assert PC.cache_path(fx["key_path"], "f" * 64) != path
    # the public release holds none of it
    from seal_diffusion.fileio import safe_open_keys

    assert not any("latents" in k or "f_mid" in k or "directions" in k for k in safe_open_keys(fx["lora"]))


def test_cli_functional_needs_base_and_plain_verify_is_unchanged(fx, tmp_path, capsys):
    """Without --base the base the key records is used (tests/test_suspect_reader.py); a key that records none
    needs --base."""
    from seal_diffusion.cli import main

    unknown = SealKey.load(fx["key_path"])
    unknown.base_model = "unknown"
    key_path = unknown.save(tmp_path / "nobase.sealkey")
    assert main(["verify", "--key", str(key_path), fx["lora"], "--functional"]) == 2
    assert "--base" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert main(["verify", "--key", fx["key_path"], fx["lora"], "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "functional" not in r and "weight" not in r and r["detected"] is True


def test_app_panel_says_both_tests_in_plain_words(fx):
    from ui import functional as ui_functional

    hidden = ui_functional.run(fx["key_path"], [fx["lora"]], "tiny", 3.3, False)
    assert hidden.visible is False
    shown = ui_functional.run(fx["key_path"], [fx["lora"]], "tiny", 3.3, True, n_probes=N_PROBES, size=SIZE)
    text = shown.value
    assert "your LoRA — found" in text and "Weight test" in text and "Function test" in text
    assert "behaves" in text


def test_robustness_distillation_rows(fx, tmp_path):
    """The robustness report's distillation block: fidelity kept and both tests per row (a tiny 5-step copy)."""
    from seal_diffusion.cli.commands_attack import _distill_specs
    from seal_diffusion.progress import Ticker as _Ticker
    from seal_diffusion.reports.robustness import _distillation, plan_for

    assert plan_for(False).distill and not plan_for(True).distill
    assert _distill_specs(["4:400", "8:100"]) == [(4, 400), (8, 100)]
    plan = plan_for(True, distill=[(2, 5)])
    plan.functional_probes, plan.functional_size = 2, SIZE
    ticks = []
    def weight(lf, name, fid=True):  # the weight test itself is tested elsewhere
        return {"neg_log10_p": 0.5}, None, None

    out = _distillation(plan, fx["key"], fx["lora"], fx["pipe"], "tiny", None, 3.3, 0, tmp_path,
                        _Ticker(100, lambda d, t, label: ticks.append(label)), {"neg_log10_p": 14.4}, [], weight)
    release, copy = out["rows"]
    assert release["functional_detected"] and release["combined_detected"]
    assert copy["attack"] == "distill rank 2, 5 steps" and -1.0 < copy["fidelity_kept"] < 1.0
    assert set(copy) >= {"neg_log10_p", "functional_neg_log10_p", "combined_neg_log10_p", "fidelity_kept"}
    assert ticks
