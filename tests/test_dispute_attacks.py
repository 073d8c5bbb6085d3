"""The owner wins the dispute against the attacks of issue 21: the adaptive forger (undated, or stamped after the
owner), claimants who attach a bad timestamp (tampered, untrusted, replayed), a thief's key for an fp16 / bf16 / int8
re-save of the release, and a thief's own SEAL training on top of the stolen file — each stamped after the owner.

Every dispute here runs the full check (passports, R1, R2 with the subject's images, timestamps) through
:func:`seal_diffusion.ownership.dispute.dispute`. The adaptive forger (fitted C̃_p from C̃ + 10 %, pushed apart) passes R2; a
stolen, re-expressed copy of the owner's key passes every check — only the timestamps separate it from the owner.
"""

import time
from pathlib import Path

import pytest
import torch
from tsa_helpers import LocalTSA

from seal_diffusion.attacks.file_attacks import quantize
from seal_diffusion.ownership.dispute import ClaimInput, dispute
from seal_diffusion.ownership.forgery import forge, public_modules
from seal_diffusion.core.keyfile import ModuleKey, SealKey
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.core.passport import pair_problem
from seal_diffusion.ownership.timestamp import write_request

PROMPT = "a photo of sks cat"
FORGE_STEPS = 12  # the adaptive forger starts next to C̃, so a short fit already passes R2 (asserted below)


def _claims(report):
    return {c.key: c for c in report.claims}


def _check(claim, name):
    return next(k for k in claim.checks if k.name == name)


def _rebased(key: SealKey, seed: int) -> SealKey:
    """The owner's key in another basis (B·R, Rᵀ·C·Sᵀ, S·A with R, S orthogonal): a claim that passes every check
    (it is the owner's key, stolen and re-expressed) — the strongest claimant there can be; only dates order it."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for n, mk in key.modules.items():
        while n not in mods or pair_problem(mods[n].passport, mods[n].passport_p):
            r = torch.linalg.qr(torch.randn(key.rank, key.rank, generator=g, dtype=torch.float64))[0]
            q = torch.linalg.qr(torch.randn(key.rank, key.rank, generator=g, dtype=torch.float64))[0]
            mods[n] = ModuleKey((q @ mk.lora_A.double()).float(), (mk.lora_B.double() @ r).float(),
                                (r.T @ mk.passport.double() @ q.T).float(), (r.T @ mk.passport_p.double() @ q.T).float())
    return SealKey(mods, key.rank, key.alpha, key.base_model, key.target_modules)


# forger fits and thief training, 6 min 16 s on 2 cores (2026-12-04, a one-thread experiment beside it part of the time;
# each key's R2 measured once per process):
# opt-in (`pytest -m slow`), not in the README's test command
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def case(owner_training, subject_dir, tmp_path_factory):
    """The owner's key (a copy), stamped first by a local TSA; the adaptive forger's key for the release and a stolen,
    re-expressed copy of the owner's key (both unstamped); a second, untrusted TSA. Everything stamped later in the
    tests is at least one second (genTime's resolution) after the owner."""
    work = tmp_path_factory.mktemp("dispute-attacks")
    tsa, rogue = LocalTSA(work / "tsa"), LocalTSA(work / "rogue-tsa")
    owner_key = SealKey.load(owner_training["key_path"])
    owner = owner_key.save(work / "owner.sealkey")
    owner_tsr = tsa.reply(write_request(owner)[0], owner.with_suffix(".tsr"))
    pipe = owner_training["pipeline"]
    forged = forge(public_modules(owner_training["diffusers_path"]), "optimised", seed=21, base=pipe,
                   data=subject_dir, prompt=PROMPT, steps=FORGE_STEPS, repel=1.0, start="C")
    forger = forged.save(work / "forger.sealkey")
    stolen = _rebased(owner_key, 5).save(work / "stolen.sealkey")
    time.sleep(1.1)
    return dict(work=work, tsa=tsa, rogue=rogue, owner=owner, owner_tsr=owner_tsr, forger=forger, stolen=stolen,
                pipe=pipe, data=subject_dir, release=owner_training["lora_path"],
                diffusers=owner_training["diffusers_path"])


def _stamp(case, key_path, tsa=None):
    return (tsa or case["tsa"]).reply(write_request(key_path)[0], Path(key_path).with_suffix(".tsr"))


def _dispute(case, suspect, *claims):
    return dispute(suspect, list(claims), data=case["data"], prompt=PROMPT, ca=case["tsa"].ca, pipe=case["pipe"])


def _owner(case, file=None):
    return ClaimInput(str(case["owner"]), str(case["owner_tsr"]), file=file)


@pytest.mark.parametrize("attackers_stamp", ["undated", "later"])
def test_owner_beats_the_adaptive_forger_and_a_stolen_key(case, attackers_stamp):
    """(a) the adaptive forger and a stolen, re-expressed copy of the owner's key (valid in every check) claim the
    release without a timestamp: before, two valid claims with one undated → "cannot decide"; now an undated claim
    cannot outrank the dated owner. (b) both stamped after the owner: the earlier stamp wins."""
    later = attackers_stamp == "later"
    forger = ClaimInput(str(case["forger"]), str(_stamp(case, case["forger"])) if later else None)
    stolen = ClaimInput(str(case["stolen"]), str(_stamp(case, case["stolen"])) if later else None)
    report = _dispute(case, case["release"], _owner(case), forger, stolen)
    claims = _claims(report)
    owner, forger_c, stolen_c = (claims[str(case[k])] for k in ("owner", "forger", "stolen"))
    assert owner.valid and stolen_c.valid, report.summary()
    assert report.winner == str(case["owner"]) and report.exit_code == 0, report.summary()
    assert owner.outcome == "wins"
    # the adaptive forger passes R2 (docs/dispute.md); whether valid or not, he cannot win
    assert _check(forger_c, "R2 genuine pair").passed, report.summary()
    for c in (forger_c, stolen_c):
        assert c.outcome in report.markdown()
        if c.valid:
            assert ("later than" if later else "cannot outrank") in c.outcome, c.outcome
    if not later:
        assert "cannot outrank a dated claim" in report.reason


def _tampered(case, key_path, path):
    """A reply for ``key_path`` with its genTime moved one day earlier (the bytes of the time string)."""
    raw = bytearray(Path(_stamp(case, key_path)).read_bytes())
    i = raw.find(b"\x18\x0f")  # GeneralizedTime, 15 characters: YYYYMMDDhhmmssZ
    day = int(raw[i + 8:i + 10])
    raw[i + 8:i + 10] = f"{day - 1 if day > 1 else 28:02d}".encode()
    path.write_bytes(bytes(raw))
    return path


def test_a_bad_timestamp_costs_only_its_date(case):
    """(c) claimants who attach a reply that does not check — backdated (tampered), from their own TSA (untrusted),
    the owner's reply replayed for another key — lose their date, with the reason in the report; the dispute goes on
    (before: exit 2 for everyone) and the owner, stamped and valid, wins. The stolen key is valid in every check, so
    only the date separates it from the owner."""
    copy = SealKey.load(case["stolen"]).save(case["work"] / "stolen-copy.sealkey")
    bad = {"tampered": ClaimInput(str(case["stolen"]), str(_tampered(case, case["stolen"], case["work"] / "t.tsr"))),
           "untrusted": ClaimInput(str(copy), str(_stamp(case, copy, case["rogue"]))),
           "replayed": ClaimInput(str(case["forger"]), str(case["owner_tsr"]))}
    report = _dispute(case, case["release"], _owner(case), *bad.values())
    assert report.winner == str(case["owner"]), report.summary()
    claims = _claims(report)
    why = {"tampered": "not valid at the time", "untrusted": "does not trust", "replayed": "another commitment"}
    for name, claim in bad.items():
        c = claims[claim.key]
        assert c.timestamp is None and why[name] in c.timestamp_problem, (name, c.timestamp_problem)
        line = _check(c, "timestamp").detail
        assert "does not count" in line and "ErrorStack" not in line and "\n" not in line
        if c.valid:
            assert "cannot outrank" in c.outcome
    assert claims[str(case["stolen"])].valid and claims[str(copy)].valid


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_owner_beats_a_thief_of_a_resave(case, dtype):
    """(d) the thief re-saves the release in fp16 / bf16 / int8 (verify still detects it), makes his own key for his
    file (a factorisation of the re-save that detects it: R1 exact; here the cheap weak-direction-flip forger, which
    R2 rejects — benchmarks/bench_dispute.py runs the adaptive one) and stamps it after the owner. The owner's R1
    holds through the detection plus his published original (``--file``); before, it failed on a reconstruction
    error > 1e-3 (bf16 2.2e-3, int8 6.7e-3) and no claim was valid. fp16 (error 2.8e-4) passed before too."""
    resave = quantize(read_lora(case["diffusers"]), dtype).save(case["work"] / f"resave-{dtype}", overwrite=False)
    thief = forge(public_modules(resave), "flip", seed=31).save(case["work"] / f"thief-{dtype}.sealkey")
    thief_tsr = _stamp(case, thief)
    report = _dispute(case, resave, _owner(case, file=case["release"]),
                      ClaimInput(str(thief), str(thief_tsr), file=str(resave)))
    claims = _claims(report)
    owner, thief_c = claims[str(case["owner"])], claims[str(thief)]
    assert report.winner == str(case["owner"]), report.summary()
    r1 = _check(owner, "R1 ownership")
    assert r1.passed and "detects the suspect" in r1.detail
    r1_thief = _check(thief_c, "R1 ownership")
    assert r1_thief.passed and "reproduces it exactly" in r1_thief.detail, "the thief's key is made for his re-save"
    if dtype != "fp16":  # bf16 / int8: the re-save is no exact reproduction; R1 needs the published original
        assert "transformed copy" in r1.detail and "reproduced exactly" in r1.detail
        no_file = _dispute(case, resave, _owner(case), ClaimInput(str(thief), str(thief_tsr)))
        bare = _check(_claims(no_file)[str(case["owner"])], "R1 ownership")
        assert not bare.passed and "--file" in bare.detail
        assert no_file.winner is None, "without his original the owner has not shown R1"


def test_owner_beats_a_thief_who_trains_seal_on_top(case, tmp_path):
    """(e) the thief trains his own SEAL run on top of the stolen release (``--method seal --init_lora``), publishes
    the result and stamps his key after the owner. The owner's key still detects the thief's file (measured −log10 p
    4.1 after 30 steps; the reconstruction error is ≫ 1e-3, so before, the owner's R1 failed and no claim was valid);
    the dispute over the thief's file and over the release goes to the owner: valid, and dated first. (Measured: the
    thief's key does not detect the release, −log10 p 0.0, and his C_p loses 56 % of C's improvement after 30 steps:
    R2 fails — were it valid, his later date would lose.)"""
    from seal_diffusion.training import parse_args, train

    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(case["data"]),
                       "--instance_prompt", PROMPT, "--output_dir", str(tmp_path), "--output_name", "stolen",
                       "--method", "seal", "--init_lora", case["release"], "--max_train_steps", "30",
                       "--learning_rate", "1e-3", "--seed", "41", "--cache_latents"])
    result = train(args)
    result["network"].remove()
    thief, thief_file = Path(result["key_path"]), result["lora_path"]
    thief_tsr = _stamp(case, thief)
    for suspect in (thief_file, case["release"]):
        report = _dispute(case, suspect, _owner(case, file=case["release"]),
                          ClaimInput(str(thief), str(thief_tsr), file=thief_file))
        claims = _claims(report)
        owner, thief_c = claims[str(case["owner"])], claims[str(thief)]
        assert report.winner == str(case["owner"]), report.summary()
        assert owner.valid and _check(owner, "R1 ownership").passed
        assert thief_c.timestamp > owner.timestamp
        assert "later than" in thief_c.outcome or not thief_c.valid, thief_c.outcome


@pytest.mark.parametrize("owner_seed", [100, 101, 102])
def test_other_owners_keys_detect_a_thiefs_seal_run_on_top(owner_seed, subject_dir, tmp_path):
    """(e) for owners other than the fixture's (bench_dispute.py's settings: rank 4, 60 steps at 2e-3, seeds 100…):
    the thief's 30-step SEAL run at 1e-3 on top of the release leaves some modules nearly untouched and moves others
    by 20–30× the passport's size. Measured on bench_dispute.py's owner 0 (2026-12-04): the old statistic (contrast
    over ‖Ĉ_m‖) gave −log10 p 2.6 — the owner's R1 failed, no claim was valid —, the per-module t (contrast over
    the module's own drift, :func:`seal_diffusion.detection.verify.contrast_t`) gives 5.1. The owner's key must
    detect the thief's file, so that R1 holds and the earlier date decides."""
    from seal_diffusion.detection.verify import load_suspect, verify
    from seal_diffusion.training import parse_args, train
    from small_owner import fixed_scrypt_salt

    common = ["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(subject_dir), "--instance_prompt",
              PROMPT, "--cache_latents"]
    with fixed_scrypt_salt():
        owner = train(parse_args(common + ["--output_dir", str(tmp_path / "owner"), "--output_name", "cat", "--rank",
                                           "4", "--max_train_steps", "60", "--learning_rate", "2e-3", "--seed",
                                           str(owner_seed), "--secret", f"owner {owner_seed}"]))
    owner["network"].remove()
    thief = train(parse_args(common + ["--output_dir", str(tmp_path / "thief"), "--output_name", "stolen", "--method",
                                       "seal", "--init_lora", owner["lora_path"], "--max_train_steps", "30",
                                       "--learning_rate", "1e-3", "--seed", str(owner_seed + 2900)]))
    thief["network"].remove()
    key = SealKey.load(owner["key_path"])
    report = verify(key, load_suspect(thief["lora_path"], key, None))
    assert report.detected, f"owner seed {owner_seed}: −log10 p {report.neg_log10_p:.2f}"
    assert report.reconstruction_error > 0.1, "the thief's training really moved the weights"
