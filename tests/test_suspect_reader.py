"""One reader of suspects for both tests (issue 21): a release or a distilled copy re-saved by an attacker in any
layout frontends load keeps its weight and function-level scores; sign and strength applied at load time are found;
LoRAs of another model family are one clear error (verify) or "not applicable" (scan).

The re-savers below are the attacker's code, written here from the layouts' definitions (LyCORIS, PEFT, kohya), not
from the reader under test.
"""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as TF

from seal_diffusion.detection import functional as F
from seal_diffusion.detection import probe_cache as PC
from seal_diffusion.cli import main as cli_main
from seal_diffusion.core.keyfile import ModuleKey, SealKey
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.core.passport import make_passports
from seal_diffusion.detection.probes import suspect_outputs
from seal_diffusion.detection.scan import scan
from seal_diffusion.formats.suspect_weights import merge_suspect_into, restore
from seal_diffusion.detection.verify import combine_suspects, load_suspect, prepare, verify, verify_path

from test_layouts import _ldm_of  # one copy of the diffusers → LDM name map

N_PROBES, SIZE = 4, 16
FLOOR = 47 * math.log10(2)  # two-sided floor of the tiny default's 48 modules
LAYOUTS = ("kohya", "lycoris-full+1-plain", "lycoris-full", "loha", "lokr", "locon+conv", "peft", "peft-base-model",
           "ldm", "fp16", "bf16")


def resave(factors: dict, layout: str, unet, path) -> str:
    """The attacker's re-save of ``{module: (down, up)}`` (scale in up), unchanged in behaviour, in ``layout``."""
    from safetensors.torch import save_file

    t: dict[str, torch.Tensor] = {}
    ldm = _ldm_of(unet) if layout == "ldm" else {}
    for i, (m, (down, up)) in enumerate(sorted(factors.items())):
        stem = "lora_unet_" + m.replace(".", "_")
        r = down.shape[0]
        if layout in ("kohya", "fp16", "bf16") or (layout == "lycoris-full+1-plain" and i == 0):
            dt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(layout, torch.float32)
            t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down.to(dt), up.to(dt)
            t[f"{stem}.alpha"] = torch.tensor(float(r))
        elif layout.startswith("lycoris-full"):
            t[f"{stem}.diff"] = up @ down
        elif layout == "loha":  # (w1a w1b) ⊙ (w2a w2b) · α/r: w2 = 2 everywhere, α = r/2
            t[f"{stem}.hada_w1_a"], t[f"{stem}.hada_w1_b"] = up, down
            t[f"{stem}.hada_w2_a"], t[f"{stem}.hada_w2_b"] = torch.full((up.shape[0], 1), 2.0), torch.ones(1, down.shape[1])
            t[f"{stem}.alpha"] = torch.tensor(r / 2.0)
        elif layout == "lokr":  # kron(w1, w2_a w2_b) · α/r with w1 = [[3]], α = r/3
            t[f"{stem}.lokr_w1"] = torch.tensor([[3.0]])
            t[f"{stem}.lokr_w2_a"], t[f"{stem}.lokr_w2_b"] = up, down
            t[f"{stem}.alpha"] = torch.tensor(r / 3.0)
        elif layout == "locon+conv":  # α = r/2 with down doubled; plus the conv layers LoCon adds, up = 0 (its init)
            t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down * 2, up
            t[f"{stem}.alpha"] = torch.tensor(r / 2.0)
        elif layout == "peft":
            t[f"unet.{m}.lora_A.weight"], t[f"unet.{m}.lora_B.weight"] = down, up
        elif layout == "peft-base-model":
            t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"] = down, up
        elif layout == "ldm":
            s = "lora_unet_" + ldm[m].replace(".", "_")
            t[f"{s}.lora_down.weight"], t[f"{s}.lora_up.weight"], t[f"{s}.alpha"] = down, up, torch.tensor(float(r))
        elif layout == "negated":
            t[f"{stem}.lora_down.weight"], t[f"{stem}.lora_up.weight"] = down, -up
            t[f"{stem}.alpha"] = torch.tensor(float(r))
        else:
            raise ValueError(layout)
    if layout == "locon+conv":
        for name, mod in unet.named_modules():
            if isinstance(mod, torch.nn.Conv2d) and ".resnets." in name:
                o, c, kh, kw = mod.weight.shape
                s = "lora_unet_" + name.replace(".", "_")
                t[f"{s}.lora_down.weight"] = torch.randn(4, c, kh, kw)
                t[f"{s}.lora_up.weight"] = torch.zeros(o, 4, 1, 1)
                t[f"{s}.alpha"] = torch.tensor(4.0)
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def fx(owner_training, tmp_path_factory):
    """The owner's key (private folder, its cache), the release, a distilled copy (short run) and the UNet."""
    from seal_diffusion.models.base_model import load_pipeline

    d = tmp_path_factory.mktemp("reader")
    key_path = shutil.copy(owner_training["key_path"], d / "cat.sealkey")
    shutil.copy(os.path.join(owner_training["output_dir"], "README.md"), d / "README.md")
    key = SealKey.load(key_path)
    pipe = load_pipeline("tiny")
    cache = PC.owner_cache(key, pipe, key_path=key_path, n_probes=N_PROBES, size=SIZE)
    return dict(dir=d, key_path=str(key_path), key=key, pipe=pipe, cache=cache, release=owner_training["lora_path"])


@pytest.fixture(scope="module")
def copy(distilled_copy):
    """A distilled copy of the release (conftest: 150 steps on 16×16 latents, shared with the function-level tests)."""
    return distilled_copy["path"]


def _functional(fx, paths, strengths=None) -> float:
    unet = fx["pipe"].unet
    originals, _ = merge_suspect_into(unet, paths, strengths)
    try:
        return F.functional_test(fx["cache"], suspect_outputs(unet, fx["cache"].probes)).neg_log10_p
    finally:
        restore(unet, originals)


def _factors(fx, path) -> dict:
    return read_lora(path).by_module(fx["key"].modules)


def test_every_layout_of_the_release_and_of_a_distilled_copy_keeps_both_scores(fx, copy, tmp_path, capsys):
    unet = fx["pipe"].unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    scores = {}
    for which in ("release", "copy"):
        factors = _factors(fx, fx["release"] if which == "release" else copy)
        for layout in LAYOUTS:
            path = resave(factors, layout, unet, tmp_path / f"{which}-{layout}.safetensors")
            w = verify_path(fx["key"], path).neg_log10_p
            scores[which, layout] = (w, _functional(fx, path))
    with capsys.disabled():
        print("\nlayout: release weight / functional | distilled copy weight / functional")
        for layout in LAYOUTS:
            (rw, rf), (cw, cf) = scores["release", layout], scores["copy", layout]
            print(f"  {layout:22s} {rw:5.2f} / {rf:5.2f} | {cw:5.2f} / {cf:5.2f}")
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items()), "the UNet must be restored"
    ref_release, ref_copy = scores["release", "kohya"], scores["copy", "kohya"]
    assert ref_release[0] == pytest.approx(FLOOR, abs=1e-6) and ref_release[1] >= 8, ref_release
    assert ref_copy[1] >= 3.3 and ref_copy[1] > ref_copy[0] + 2, ref_copy  # the function test finds the copy
    for layout in LAYOUTS:
        tol = 0.5 if layout in ("fp16", "bf16") else 1e-3  # exact re-saves: the same ΔW up to float rounding
        for which, ref in (("release", ref_release), ("copy", ref_copy)):
            w, f = scores[which, layout]
            assert f == pytest.approx(ref[1], abs=tol), (which, layout, f, ref[1])
            assert w == pytest.approx(ref[0], abs=max(tol, 0.05)), (which, layout, w, ref[0])


def test_diff_only_release_never_makes_functional_exit_2(fx, tmp_path, capsys):
    path = resave(_factors(fx, fx["release"]), "lycoris-full", fx["pipe"].unet, tmp_path / "diff.safetensors")
    out = tmp_path / "r.json"
    rc = cli_main(["verify", "--key", fx["key_path"], path, "--functional", "--probes", str(N_PROBES),
                   "--probe-size", str(SIZE), "--json", str(out)])  # no --base: the key records "tiny"
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert rc == 0 and r["functional"]["neg_log10_p"] >= 8 and r["weight"]["neg_log10_p"] >= 14, printed


def test_conv_layers_are_applied_as_the_frontends_compose_them(fx, tmp_path):
    """LoCon conv (1×1 up after a k×k down), with a Tucker core, LoHa and LoKr on a conv layer, LyCORIS full with a
    bias: the patched conv's output equals the frontends' composition, computed here with conv2d itself."""
    from safetensors.torch import save_file

    unet = fx["pipe"].unet
    name = next(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                and ".resnets." in n)
    conv = unet.get_submodule(name)
    o, c, kh, kw = conv.weight.shape
    stem = "lora_unet_" + name.replace(".", "_")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, 8, 8, generator=g)
    down, up, mid = torch.randn(2, c, kh, kw, generator=g), torch.randn(o, 2, 1, 1, generator=g), \
        torch.randn(2, 2, kh, kw, generator=g)
    down1 = torch.randn(2, c, 1, 1, generator=g)
    w1a, w1b, w2a, w2b = (torch.randn(o, 2, generator=g), torch.randn(2, c * kh * kw, generator=g),
                          torch.randn(o, 2, generator=g), torch.randn(2, c * kh * kw, generator=g))
    k1, k2 = torch.randn(2, 2, generator=g), torch.randn(o // 2, c // 2, kh, kw, generator=g)
    diff, diff_b = torch.randn(o, c, kh, kw, generator=g), torch.randn(o, generator=g)
    cases = {
        "locon": ({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)},
                  lambda: TF.conv2d(TF.conv2d(x, down, padding=1), up) * 0.5),
        "locon-tucker": ({f"{stem}.lora_down.weight": down1, f"{stem}.lora_mid.weight": mid,
                          f"{stem}.lora_up.weight": up},
                         lambda: TF.conv2d(TF.conv2d(TF.conv2d(x, down1), mid, padding=1), up)),
        "loha": ({f"{stem}.hada_w1_a": w1a, f"{stem}.hada_w1_b": w1b, f"{stem}.hada_w2_a": w2a,
                  f"{stem}.hada_w2_b": w2b, f"{stem}.alpha": torch.tensor(4.0)},
                 lambda: TF.conv2d(x, ((w1a @ w1b) * (w2a @ w2b)).reshape(o, c, kh, kw) * 2, padding=1)),
        "lokr": ({f"{stem}.lokr_w1": k1, f"{stem}.lokr_w2": k2},
                 lambda: TF.conv2d(x, torch.stack([torch.stack([k1[i // (o // 2), j // (c // 2)]
                                                                * k2[i % (o // 2), j % (c // 2)]
                                                                for j in range(c)]) for i in range(o)]), padding=1)),
        "full": ({f"{stem}.diff": diff, f"{stem}.diff_b": diff_b},
                 lambda: TF.conv2d(x, diff, diff_b, padding=1)),
    }
    for kind, (tensors, expected) in cases.items():
        # a Linear layer in plain form too, so the file is one the weight test reads
        tensors = dict(tensors)
        m, (dn, u) = next(iter(_factors(fx, fx["release"]).items()))
        s = "lora_unet_" + m.replace(".", "_")
        tensors[f"{s}.lora_down.weight"], tensors[f"{s}.lora_up.weight"] = dn, u
        path = tmp_path / f"{kind}.safetensors"
        save_file(tensors, str(path))
        base_out = conv(x)
        originals, applied = merge_suspect_into(unet, path)
        try:
            got = conv(x) - base_out
        finally:
            restore(unet, originals)
        assert torch.allclose(got, expected(), rtol=1e-4, atol=1e-4 * float(expected().abs().max())), kind
        assert not applied.not_applied, (kind, applied.not_applied)


def test_negated_release_is_found_and_said_so(fx, tmp_path, capsys):
    path = resave(_factors(fx, fx["release"]), "negated", fx["pipe"].unet, tmp_path / "neg.safetensors")
    rep = verify_path(fx["key"], path)
    assert rep.detected and rep.sign == -1 and rep.neg_log10_p == pytest.approx(FLOOR, abs=1e-6)
    assert _functional(fx, path) < 3.3  # loaded at +1 its behaviour is far from the release's …
    func = F.verify_functional(fx["key_path"], path, n_probes=N_PROBES, size=SIZE)
    assert func.strength_sign == -1 and func.neg_log10_p >= 8, func  # … at −1, the test's choice, it is the release
    assert cli_main(["verify", "--key", fx["key_path"], path]) == 0
    assert "opposite sign" in capsys.readouterr().out


def _split_strengths(fx, tmp_path, factor=30.0, seed=4):
    """The release split for strengths 1 and 0.5: A = release + R (rank 2r), B = −2R, ‖R‖ = factor·‖release‖."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    a_file, b_file = {}, {}
    for m, (down, up) in _factors(fx, fx["release"]).items():
        stem = "lora_unet_" + m.replace(".", "_")
        rd, ru = torch.randn(down.shape, generator=g), torch.randn(up.shape, generator=g)
        ru = ru * float((up @ down).norm() / (ru @ rd).norm()) * factor
        a_file[f"{stem}.lora_down.weight"], a_file[f"{stem}.lora_up.weight"] = torch.cat([down, rd]), torch.cat([up, ru], 1)
        b_file[f"{stem}.lora_down.weight"], b_file[f"{stem}.lora_up.weight"] = rd, -2 * ru
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a_file, str(pa))
    save_file(b_file, str(pb))
    return str(pa), str(pb)


def test_release_split_for_strengths_1_and_half_is_found_together(fx, tmp_path, capsys):
    pa, pb = _split_strengths(fx, tmp_path)
    alone = [verify_path(fx["key"], p).neg_log10_p for p in (pa, pb)]
    both_at_1 = combine_suspects([load_suspect(p, fx["key"]) for p in (pa, pb)], [1.0, 1.0])
    both_at_1.parts = []  # no fit: both at strength 1, what verify did before
    plain_sum = verify(fx["key"], both_at_1).neg_log10_p
    rep = verify_path(fx["key"], [pa, pb])
    with capsys.disabled():
        print(f"\nsplit 1 / 0.5: A {alone[0]:.2f}, B {alone[1]:.2f}, both at 1 {plain_sum:.2f}, fitted "
              f"{rep.neg_log10_p:.2f} at {rep.strengths}")
    assert max(alone) < 3.3 and plain_sum < 3.3
    assert rep.detected and rep.neg_log10_p == pytest.approx(FLOOR, abs=0.05)
    assert rep.strengths == pytest.approx([1.0, 0.5], abs=1e-3)
    assert _functional(fx, [pa, pb], rep.strengths) >= 8  # the function test loads them at those strengths
    assert cli_main(["scan", "--combine", "--key", fx["key_path"], pa, pb, "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["detected"] for r in rows] == [False, False, True]


def _decoy(key, i):
    dec = make_passports(list(key.modules), key.rank, f"reader decoy {i}")
    return SealKey({n: ModuleKey(mk.lora_A, mk.lora_B, *dec[n]) for n, mk in key.modules.items()}, key.rank, key.alpha)


def test_fitted_strengths_are_coin_blind_and_decoys_are_not_accused(fx, tmp_path):
    """The strength fit never looks at the coin: swapping C and C_p in any modules leaves the strengths unchanged.
    Then 80 coin-flip decoys (the key's B, A with fresh passports) on the suspects of this file's attacks (the split
    parts together, the negated release, the release with an innocent LoRA): false positives at the rates the
    p-value promises."""
    key = fx["key"]
    pa, pb = _split_strengths(fx, tmp_path)
    neg = resave(_factors(fx, fx["release"]), "negated", fx["pipe"].unet, tmp_path / "neg.safetensors")
    g = torch.Generator().manual_seed(11)
    innocent = {m: (torch.randn(d.shape, generator=g), torch.randn(u.shape, generator=g) * float(u.norm()) / 2)
                for m, (d, u) in _factors(fx, fx["release"]).items()}
    pi = resave(innocent, "kohya", fx["pipe"].unet, tmp_path / "innocent.safetensors")
    suspects = {"split A+B": [pa, pb], "negated": [neg], "release + innocent": [fx["release"], pi],
                "three files": [pa, pi, neg]}
    loaded = {k: combine_suspects([load_suspect(p, key) for p in v]) for k, v in suspects.items()}
    prep = prepare(key)
    # coin blindness of the fit: relabel C/C_p in half the modules
    flip = {n: i % 2 == 0 for i, n in enumerate(key.modules)}
    swapped = SealKey({n: ModuleKey(mk.lora_A, mk.lora_B, *((mk.passport_p, mk.passport) if flip[n] else
                                                             (mk.passport, mk.passport_p)))
                       for n, mk in key.modules.items()}, key.rank, key.alpha)
    for label in ("release + innocent", "three files"):
        a, b = verify(prep, loaded[label]), verify(prep.with_passports(swapped), loaded[label])
        assert a.strengths is not None and [abs(x) for x in a.strengths] == pytest.approx(
            [abs(x) for x in b.strengths], rel=1e-9), label
    hits = {k: [0, 0] for k in suspects}
    for i in range(80):
        dprep = prep.with_passports(_decoy(key, i))
        for label, s in loaded.items():
            nlp = verify(dprep, s).neg_log10_p
            hits[label][0] += nlp >= 1.0
            hits[label][1] += nlp >= 3.3
    bound = 0.1 * 80 + 3 * math.sqrt(80 * 0.1 * 0.9)  # α = 0.1: 8 expected, 99.9 % binomial bound ≈ 16.5
    print("decoy hits (α = 0.1, α = 5e-4) of 80:", hits)
    assert all(h[0] <= bound and h[1] <= 1 for h in hits.values()), hits


def _xl_key():
    """A key on tiny-xl's attention modules (random factors and passports): enough for SDXL-shaped files."""
    from seal_diffusion.models.base_model import load_pipeline
    from seal_diffusion.core.network import find_target_modules

    unet = load_pipeline("tiny-xl").unet
    g = torch.Generator().manual_seed(5)
    mods = {}
    names = list(find_target_modules(unet))
    pp = make_passports(names, 4, "xl key")
    for n in names:
        lin = unet.get_submodule(n)
        mods[n] = ModuleKey(torch.randn(4, lin.in_features, generator=g) * 0.1,
                            torch.randn(lin.out_features, 4, generator=g) * 0.1, *pp[n])
    return SealKey(mods, 4, 4.0, "tiny-xl", architecture="sdxl_base_v1-0")


def test_mixed_model_families(fx, tmp_path, capsys):
    """verify over SD 1.5 + SDXL files: one line, exit 2; scan with an SD 1.5 and an SDXL key over a mixed folder:
    other-family pairs are "not applicable" and the exit code comes from the pairs that apply."""
    from seal_diffusion.core.export import export_lora

    xl = _xl_key()
    xl_path = xl.save(tmp_path / "xl.sealkey")
    folder = tmp_path / "mixed"
    folder.mkdir()
    sd = shutil.copy(fx["release"], folder / "sd15.safetensors")
    xl_file = export_lora(xl, folder / "xl.safetensors", "kohya", "xl")
    rc = cli_main(["verify", "--key", fx["key_path"], str(sd), str(xl_file)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    rows, _ = scan([fx["key_path"], str(xl_path)], [folder], combine=True)
    by = {(os.path.basename(r.key), os.path.basename(r.file)): r for r in rows}
    assert by["cat.sealkey", "sd15.safetensors"].detected and by["xl.sealkey", "xl.safetensors"].detected
    for pair in (("cat.sealkey", "xl.safetensors"), ("xl.sealkey", "sd15.safetensors")):
        assert by[pair].error.startswith("not applicable") and not by[pair].applicable, by[pair]
    assert cli_main(["scan", "--key", fx["key_path"], "--key", str(xl_path), str(folder)]) == 0
    assert "not applicable" in capsys.readouterr().out
    assert cli_main(["scan", "--combine", "--key", fx["key_path"], "--key", str(xl_path), str(folder)]) == 0
    capsys.readouterr()
    # only other-family files for a key: nothing applies, nothing was checked
    assert cli_main(["scan", "--key", str(xl_path), str(sd)]) == 2


def test_first_functional_run_shows_progress_and_uses_the_key_s_base(fx, tmp_path, capsys):
    """No cache yet for this key copy: the owner's probes are computed with a tqdm bar; no --base: the key's."""
    key_path = shutil.copy(fx["key_path"], tmp_path / "fresh.sealkey")
    assert SealKey.load(key_path).base_model == "tiny"
    rep = F.verify_functional(key_path, fx["release"], n_probes=2, size=SIZE, show_progress=True)
    err = capsys.readouterr().err
    assert "owner's probes" in err and "2/2" in err, err[-500:]
    assert rep.n_probes == 2 and rep.neg_log10_p > 3.3
    F.verify_functional(key_path, fx["release"], n_probes=2, size=SIZE, show_progress=True)  # cache now warm
    assert "owner's probes" not in capsys.readouterr().err
    unknown = SealKey.load(key_path)
    unknown.base_model = "unknown"
    with pytest.raises(Exception, match="needs --base MODEL: this key does not record its base model"):
        F.verify_functional(unknown, fx["release"], n_probes=2, size=SIZE)


def test_function_test_two_sided_and_sign_choice_are_exact_over_80_coin_flips(fx, tmp_path):
    """Coin flips of the owner's directions are exactly suspects that do not know the coins (d → E·d). The
    two-sided p of the negated release (tested at the sign the f_mid criterion picks) and of an innocent LoRA over
    80 flips: false positives at the rates the p-value promises."""
    from seal_diffusion.detection.verify import two_sided_neg_log10_p

    cache = fx["cache"]
    neg = resave(_factors(fx, fx["release"]), "negated", fx["pipe"].unet, tmp_path / "neg.safetensors")
    g = torch.Generator().manual_seed(12)
    innocent = {m: (torch.randn(d.shape, generator=g), torch.randn(u.shape, generator=g) * float(u.norm()) / 2)
                for m, (d, u) in _factors(fx, fx["release"]).items()}
    pi = resave(innocent, "kohya", fx["pipe"].unet, tmp_path / "innocent.safetensors")
    gen = torch.Generator().manual_seed(0)
    hits = {}
    for label, path, sign in (("negated release at −1", neg, -1.0), ("innocent", pi, 1.0)):
        unet = fx["pipe"].unet
        originals, _ = merge_suspect_into(unet, path, [sign])
        try:
            f_s = suspect_outputs(unet, cache.probes)
        finally:
            restore(unet, originals)
        d0 = F.module_stats(cache, f_s)
        nlps = []
        for _ in range(80):
            e = torch.randint(0, 2, (cache.n_modules,), generator=gen).double() * 2 - 1
            nlps.append(two_sided_neg_log10_p((e * d0).tolist()))
        hits[label] = (sum(x >= 1.0 for x in nlps), sum(x >= 3.3 for x in nlps))
    print("function test, coin-flip decoys of 80 (α = 0.1, α = 5e-4):", hits)
    assert all(h[0] <= 0.1 * 80 + 3 * math.sqrt(80 * 0.09) and h[1] <= 1 for h in hits.values()), hits
