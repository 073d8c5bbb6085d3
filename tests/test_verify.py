"""Verification: exact null calibration, detection of copies and attacked copies, CLI contract (exit codes, JSON)."""

import json
import math

import pytest
import torch
from small_owner import small_owner

from seal_diffusion.attacks import file_attacks as attacks
from seal_diffusion.cli import main as cli_main
from seal_diffusion.core.export import export_lora
from seal_diffusion.core.keyfile import ModuleKey, SealKey
from seal_diffusion.formats.lora_file import LoraFile, read_lora
from seal_diffusion.core.network import SealNetwork, find_target_modules
from seal_diffusion.core.passport import make_passports
from seal_diffusion.detection.verify import (T_CAP, Suspect, contrast_t, neg_log10_p, prepare, recover_passports,
                                            sign_flip_neg_log10_p, verify)

RANK = 4


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """A small SEAL run on the tiny UNet (alternating C/C_p) → key + exported files."""
    o = small_owner(tmp_path_factory.mktemp("owner"), "owner secret")
    o["diffusers"] = export_lora(o["key"], o["dir"] / "dl", "diffusers")
    return o


def _suspect(lora: LoraFile, key) -> Suspect:
    return Suspect(lora.path or "x", lora.layout, factors=lora.by_module(key.modules))


def test_neg_log10_p_in_log_space():
    assert neg_log10_p(0.0) == pytest.approx(math.log10(2))
    assert neg_log10_p(3.0) == pytest.approx(-math.log10(0.0013498980316301), rel=1e-9)
    assert neg_log10_p(1000.0) > 200000  # p ≈ 1e-217151, no underflow
    assert math.isfinite(neg_log10_p(1e4))


def _exact_sign_flip_tail(d, t):
    """P(Σ ε_m |d_m| ≥ t) by enumerating all 2^M sign patterns."""
    a = torch.tensor([abs(x) for x in d], dtype=torch.float64)
    m = len(d)
    signs = ((torch.arange(2 ** m)[:, None] >> torch.arange(m)) & 1).double() * 2 - 1
    return float(((signs @ a) >= t - 1e-12).double().mean())


def test_sign_flip_p_value_is_exact_up_to_its_conservative_grid():
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        m = 4 + trial % 11
        d = (torch.randn(m, generator=g, dtype=torch.float64) + 0.6 * (trial % 3)).tolist()
        if trial % 5 == 0:
            d[0] = 0.0
        t = sum(d)
        ours = sign_flip_neg_log10_p(d)
        if t <= 0:
            assert ours == 0.0
            continue
        exact = _exact_sign_flip_tail(d, t)
        slack = m * max(abs(x) for x in d) / 1000  # the grid may lower the threshold by at most Mδ (conservative)
        assert 10 ** -ours >= exact * (1 - 1e-9), (d, ours, exact)
        assert 10 ** -ours <= _exact_sign_flip_tail(d, t - slack) * (1 + 1e-9), (d, ours)
    assert sign_flip_neg_log10_p([1.0] * 48) == pytest.approx(48 * math.log10(2))  # every sign right: p = 2^-48


def test_recovery_matches_explicit_pseudo_inverses_for_mixed_suspects(owner):
    """Factors of the release's rank, of a padded rank, merged ΔW, and missing modules in one suspect: the batched
    Gram-matrix recovery must equal pinv(B)·ΔŴ·pinv(A)/s formed explicitly, and the reconstruction error ‖ΔŴ − sBCA‖."""
    key = owner["key"]
    release = read_lora(owner["kohya"]).by_module(key.modules)
    names = list(key.modules)
    g = torch.Generator().manual_seed(5)
    factors, deltas = {}, {}
    for i, n in enumerate(names):
        down, up = release[n]
        if i % 4 == 0:  # a noisy copy, as factors
            factors[n] = (down + 0.01 * torch.randn(down.shape, generator=g), up)
        elif i % 4 == 1:  # padded with two junk directions: rank r + 2
            factors[n] = (torch.cat([down, torch.randn(2, down.shape[1], generator=g)]),
                          torch.cat([up, 0.001 * torch.randn(up.shape[0], 2, generator=g)], 1))
        elif i % 4 == 2:  # a merged model's ΔW
            deltas[n] = up @ down + 1e-3 * torch.randn(up.shape[0], down.shape[1], generator=g)
        # i % 4 == 3: missing
    suspect = Suspect("mixed", "test", factors=factors, deltas=deltas)
    rep = verify(key, suspect)
    recovered = recover_passports(key, suspect)
    assert list(recovered) == [n for n in names if n in factors or n in deltas]  # key order
    assert rep.n_modules == len(recovered) and rep.n_modules_missing == len(names) // 4
    num = den = 0.0
    for n, c_hat in recovered.items():
        mk = key.modules[n]
        b, a = mk.lora_B.double(), mk.lora_A.double()
        dw = deltas[n].double() if n in deltas else factors[n][1].double() @ factors[n][0].double()
        expect = torch.linalg.pinv(b) @ dw @ torch.linalg.pinv(a) / key.scale
        assert torch.allclose(c_hat, expect, rtol=1e-6, atol=1e-8 * float(expect.abs().max())), n
        release_dw = key.scale * b @ mk.passport.double() @ a
        num += float((dw - release_dw).pow(2).sum())
        den += float(release_dw.pow(2).sum())
    assert rep.reconstruction_error == pytest.approx(math.sqrt(num / den), rel=1e-6)


def _full_sign_flip_dp(d, resolution=1000):
    """The untruncated subset-sum DP (every count up to Q), the reference for the truncated one."""
    import numpy as np

    a = np.abs(np.asarray(d))
    delta = a.max() / resolution
    q = np.rint(a / delta).astype(np.int64)
    q = q[q > 0]
    counts = np.zeros(int(q.sum()) + 1)
    counts[0] = 1.0
    hi = 0
    for qi in q:
        counts[qi:hi + qi + 1] += counts[:hi + 1].copy()
        hi += qi
    threshold = math.ceil((sum(d) - len(d) * delta / 2.0) / delta - 1e-9)
    k0 = max(math.ceil((threshold + int(q.sum())) / 2.0), 0)
    return -math.log10(max(float(counts[k0:].sum()) / 2.0 ** q.size, 1e-320))


def test_sign_flip_dp_counts_only_the_tail_it_needs():
    """The DP counts subset sums only up to Q − k0 (by complement symmetry): same p as the full DP, for copies
    (tail = a few patterns) and innocents (tail ≈ ½) alike, with M up to SDXL's 560 modules."""
    g = torch.Generator().manual_seed(11)
    for m, shift in [(60, 0.0), (60, 0.3), (200, 0.05), (560, 3.0), (560, 0.0)]:
        d = (torch.randn(m, generator=g, dtype=torch.float64) + shift).tolist()
        if sum(d) <= 0:
            d = [-x for x in d]
        assert sign_flip_neg_log10_p(d) == pytest.approx(_full_sign_flip_dp(d), rel=1e-12, abs=1e-12), (m, shift)


def test_pseudo_inverses_equal_numpy_pinv_for_every_kind_of_gram_matrix():
    """Cholesky inverse where provably equal to pinv; rank-deficient, zero and ill-conditioned ones fall back."""
    import numpy as np

    from seal_diffusion.detection.recovery import _pinv_sym

    g = torch.Generator().manual_seed(2)
    b = torch.randn(6, 40, 5, generator=g, dtype=torch.float64)
    b[1] = 0.0  # a zero B (untrained module)
    b[2, :, 4] = b[2, :, 3]  # rank-deficient
    b[3, :, 4] = b[3, :, 3] + 1e-7 * b[3, :, 0]  # cond ≈ 1e14: must not be inverted
    b[4] *= 1e-20  # tiny but well conditioned: an inverse, not a cut-off
    grams = b.mT @ b
    ours = _pinv_sym(grams.clone())
    for i in range(len(b)):
        ref = torch.from_numpy(np.linalg.pinv(grams[i].numpy(), hermitian=True))
        scale = float(ref.abs().max()) or 1.0
        assert float((ours[i] - ref).abs().max()) <= 1e-6 * scale, i


def test_fused_and_separate_key_algebra_agree(owner):
    """A fresh key computes BᵀB, AAᵀ inside the recovery's products; a prepared one (``ready``) beforehand."""
    key = owner["key"]
    suspect = _suspect(read_lora(owner["kohya"]), key)
    fused, separate = verify(key, suspect), verify(prepare(key).ready(), suspect)
    assert fused.neg_log10_p == pytest.approx(separate.neg_log10_p, rel=1e-12)
    assert [m.stat for m in fused.per_module] == pytest.approx([m.stat for m in separate.per_module], rel=1e-10)


def test_suspect_with_wrong_layer_shapes_is_one_clear_error(owner):
    from seal_diffusion.errors import UserError

    key = owner["key"]
    factors = read_lora(owner["kohya"]).by_module(key.modules)
    name = next(iter(factors))
    down, up = factors[name]
    factors[name] = (down[:, :1], up)  # a 1-wide input would broadcast silently if not checked
    with pytest.raises(UserError, match="another base model"):
        verify(key, Suspect("wrong.safetensors", "kohya", factors=factors))
    with pytest.raises(UserError, match="the key's layer is"):
        verify(key, Suspect("wrong", "checkpoint", deltas={name: torch.zeros(3, 3)}))


def test_prepared_key_is_reused_and_swaps_passports_exactly(owner):
    key = owner["key"]
    suspect = _suspect(read_lora(owner["kohya"]), key)
    prepared = prepare(key)
    assert prepare(prepared) is prepared
    decoy = make_passports(list(key.modules), RANK, "another claim")
    dkey = SealKey({n: ModuleKey(mk.lora_A, mk.lora_B, *decoy[n]) for n, mk in key.modules.items()},
                   key.rank, key.alpha)
    for statistic in ("contrast", "correlation"):
        fresh, reused = verify(dkey, suspect, statistic=statistic), verify(prepared.with_passports(dkey), suspect,
                                                                            statistic=statistic)
        assert reused.neg_log10_p == fresh.neg_log10_p and reused.z == fresh.z
        assert reused.reconstruction_error == pytest.approx(fresh.reconstruction_error, rel=1e-12)
    assert verify(prepared, suspect).detected and not verify(prepared.with_passports(dkey), suspect).detected


def test_copy_is_detected_and_passport_recovered_exactly(owner):
    key = owner["key"]
    for path in (owner["kohya"], owner["dir"] / "dl"):
        lora = read_lora(path)
        report = verify(key, _suspect(lora, key))
        assert report.detected and report.neg_log10_p == pytest.approx(47 * math.log10(2), rel=1e-3)  # p = 2·2^-48
        corr = verify(key, _suspect(lora, key), statistic="correlation")
        assert corr.detected and corr.neg_log10_p > 100
        assert report.n_modules == 48 and report.n_modules_missing == 0 and report.n_entries == 48 * RANK * RANK
        assert report.reconstruction_error < 1e-5
        rec = recover_passports(key, _suspect(lora, key))
        for name, c_hat in rec.items():
            assert torch.allclose(c_hat.float(), key.modules[name].passport, atol=1e-4)


@pytest.mark.parametrize(
    "attack, kwargs",
    [("rescale", dict(factor=7.0)), ("permute", dict(seed=1)), ("mix", dict(seed=2)), ("pad-rank", dict(extra=3)),
     ("refactor-svd", {})],
)
def test_product_preserving_obfuscations_leave_p_unchanged(owner, attack, kwargs):
    key = owner["key"]
    lora = read_lora(owner["kohya"])
    base = verify(key, _suspect(lora, key))
    attacked = attacks.FILE_ATTACKS[attack](lora, **kwargs)
    rep = verify(key, _suspect(attacked, key))
    assert rep.neg_log10_p == pytest.approx(base.neg_log10_p, rel=1e-4)
    if attack != "pad-rank":
        assert all(d.shape == read_lora(owner["kohya"]).entries[s][0].shape for s, (d, u) in attacked.entries.items())


@pytest.mark.parametrize(
    "attack, kwargs",
    [("prune", dict(ratio=0.9)), ("prune", dict(ratio=0.9, on="delta")), ("quantize", dict(dtype="fp16")),
     ("quantize", dict(dtype="int8")), ("noise", dict(std=0.2)), ("refactor-svd", dict(rank=2))],
)
def test_damaging_attacks_still_detected(owner, attack, kwargs):
    key = owner["key"]
    attacked = attacks.FILE_ATTACKS[attack](read_lora(owner["kohya"]), **kwargs)
    rep = verify(key, _suspect(attacked, key))
    assert rep.detected, f"{attack} {kwargs}: −log10 p = {rep.neg_log10_p:.1f}"


@pytest.mark.parametrize("statistic", ["contrast", "correlation"])
def test_null_is_calibrated_over_decoy_keys(owner, statistic):
    """200 decoy keys: the real (B, A) with fresh random passports the suspect never saw: p must be uniform."""
    key = owner["key"]
    suspect = _suspect(read_lora(owner["kohya"]), key)
    zs, hits, hits_strict = [], 0, 0
    for i in range(200):
        decoy = make_passports(list(key.modules), RANK, f"decoy {i}")
        dkey = SealKey({n: ModuleKey(mk.lora_A, mk.lora_B, decoy[n][0], decoy[n][1]) for n, mk in key.modules.items()},
                       key.rank, key.alpha)
        rep = verify(dkey, suspect, statistic=statistic)
        zs.append(rep.z)
        hits += rep.neg_log10_p >= 1.0  # α = 0.1
        hits_strict += rep.detected
    zs = torch.tensor(zs)
    assert abs(float(zs.mean())) < 0.25 and 0.8 < float(zs.std()) < 1.2
    assert hits / 200 <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 200)
    assert hits_strict <= 1  # α = 5e-4: 0.1 expected among 200


def test_contrast_t_is_coin_blind_and_keeps_the_sign_of_any_copy():
    """The per-module t of the default statistic: swapping C and C_p (the release coin) negates it exactly, whatever
    Ĉ is — so its magnitude is coin-blind and the sign-flip p-value exact; a copy at any positive strength is positive
    in every module, at a negative strength negative; drift that is the same size in every module leaves t the size
    a plain z would have."""
    names = [f"m{i}" for i in range(48)]
    pp = make_passports(names, RANK, "t statistic")
    c = torch.stack([pp[n][0] for n in names]).double()
    c_p = torch.stack([pp[n][1] for n in names]).double()
    g = torch.Generator().manual_seed(3)
    for c_hat in (torch.randn(c.shape, generator=g, dtype=torch.float64), c + 5 * torch.randn(c.shape, generator=g,
                                                                                                dtype=torch.float64)):
        t = contrast_t(c_hat, c - c_p, (c + c_p) / 2)
        swapped = contrast_t(c_hat, c_p - c, (c + c_p) / 2)
        assert torch.equal(t, -swapped) and torch.isfinite(t).all()
    for s in (0.3, 1.0, 2.5):
        assert (contrast_t(s * c, c - c_p, (c + c_p) / 2) > 0).all(), s
    assert (contrast_t(-c, c - c_p, (c + c_p) / 2) < 0).all()
    assert two_sided(contrast_t(c, c - c_p, (c + c_p) / 2).tolist()) == pytest.approx(47 * math.log10(2), rel=1e-3)


def two_sided(d):
    from seal_diffusion.detection.verify import two_sided_neg_log10_p

    return two_sided_neg_log10_p(d)


def test_a_copy_whose_modules_drifted_unequally_is_weighted_by_each_modules_drift(owner):
    """A thief's training on top of the release moves some modules a little and others far (measured: 0.1× to 30×
    the passport). Quiet modules must count more than busy ones: with half the modules moved 30× in random
    directions and half 0.1×, the weight test finds the copy at the floor of the quiet half, at least."""
    key = owner["key"]
    g = torch.Generator().manual_seed(5)
    factors, quiet_names = {}, set(list(key.modules)[::2])
    for name, mk in key.modules.items():
        c = mk.passport.double()
        drift = torch.randn(c.shape, generator=g, dtype=torch.float64)
        drift *= (0.1 if name in quiet_names else 30.0) * float(c.norm()) / float(drift.norm())
        up = (mk.lora_B.double() @ (c + drift) * key.scale).float()
        factors[name] = (mk.lora_A.clone(), up)
    report = verify(key, Suspect("drifted", "kohya", factors=factors))
    assert report.detected and report.neg_log10_p >= 23 * math.log10(2) - 0.3, report.neg_log10_p
    quiet = [m.stat for m in report.per_module if m.module in quiet_names]
    busy = [abs(m.stat) for m in report.per_module if m.module not in quiet_names]
    assert min(quiet) > 3 * max(busy) and max(quiet) <= T_CAP


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_a_resave_of_a_rank_32_release_reaches_the_floor(tmp_path, dtype):
    """Every module of a re-saved copy leans the released way; the float rounding differs by module, so the t of a
    near-exact copy spans orders of magnitude. The cap on |t| keeps them all in the test (measured without it on a
    shipped-defaults rank-32 key: fp16 11.7, bf16 10.8, int8 11.5 instead of the floor 14.1)."""
    o = small_owner(tmp_path, "rank 32", rank=32)
    key = o["key"]
    resaved = attacks.FILE_ATTACKS["quantize"](read_lora(o["kohya"]), dtype=dtype)
    report = verify(key, _suspect(resaved, key))
    assert report.neg_log10_p == pytest.approx(47 * math.log10(2), rel=1e-3), report.neg_log10_p


def test_innocent_random_loras_not_detected(owner):
    key = owner["key"]
    g = torch.Generator().manual_seed(7)
    template = read_lora(owner["kohya"])
    for i in range(20):
        entries = {s: (torch.randn(d.shape, generator=g), torch.randn(u.shape, generator=g) * 0.01)
                   for s, (d, u) in template.entries.items()}
        assert not verify(key, _suspect(LoraFile("kohya", entries), key)).detected


def test_cli_verify_exit_codes_and_json(owner, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(owner["kohya"]), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for field in ("detected", "neg_log10_p", "threshold", "statistic", "n_modules", "n_modules_missing", "n_entries",
                  "suspect_format", "per_module", "reconstruction_error"):
        assert field in report
    assert report["detected"] is True and report["suspect_format"] == "kohya" and report["threshold"] == 3.3
    assert set(report["per_module"][0]) == {"module", "stat", "neg_log10_p"}
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(owner["dir"] / "dl")]) == 0
    g = torch.Generator().manual_seed(3)
    innocent = LoraFile("kohya", {s: (torch.randn(d.shape, generator=g), torch.randn(u.shape, generator=g))
                                  for s, (d, u) in read_lora(owner["kohya"]).entries.items()})
    innocent.save(tmp_path / "innocent.safetensors")
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(tmp_path / "innocent.safetensors")]) == 1
    capsys.readouterr()
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.safetensors" in err[0]


def test_cli_attack_and_scan(owner, tmp_path, capsys):
    src = str(owner["kohya"])
    for method, extra in [("prune", ["--ratio", "0.9"]), ("mix", []), ("quantize", ["--dtype", "int8"])]:
        out = tmp_path / f"{method}.safetensors"
        assert cli_main(["attack", method, src, str(out), *extra]) == 0
        assert read_lora(out).layout == "kohya"
    assert cli_main(["attack", "merge-lora", src, str(tmp_path / "m.safetensors"), "--other", src,
                     "--weight", "0.5"]) == 0
    capsys.readouterr()
    assert cli_main(["scan", "--key", str(owner["key_path"]), str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.count("DETECTED") == 4 and "files/s" in table
    assert cli_main(["attack", "prune", src, str(tmp_path / "prune.safetensors")]) == 2  # exists, no --overwrite


def test_merged_checkpoint_is_detected(owner, tmp_path, tiny_dir):
    model = tmp_path / "merged.safetensors"
    attacks.merge_into_checkpoint(owner["kohya"], "tiny", model)
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(model), "--base", "tiny",
                     "--config", str(tiny_dir), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["suspect_format"] == "checkpoint" and report["reconstruction_error"] < 1e-3
    assert cli_main(["verify", "--key", str(owner["key_path"]), str(model)]) == 2  # needs --base


def test_shared_image_passport_is_pooled_conservatively(tmp_path):
    """With one passport shared by all modules, z_m are dependent: pooling must not count them as independent."""
    from seal_diffusion.detection.verify import pool

    assert pool([3.0, 3.0, 3.0, 3.0], [b"a", b"a", b"a", b"a"]) == pytest.approx(3.0)
    assert pool([3.0, 3.0, 3.0, 3.0], [b"a", b"b", b"c", b"d"]) == pytest.approx(6.0)
    assert pool([1.0, 3.0, 2.0], [b"a", b"a", b"b"]) == pytest.approx((2.0 + 2.0) / math.sqrt(2))
