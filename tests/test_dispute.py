"""The dispute: R2 (a genuinely trained pair) rejects the structural forgers and a second passport fitted from scratch
(not the adaptive forger that starts from C̃: docs/dispute.md), the owner passes; timestamps decide between valid
claims; the report's JSON, exit codes and bad input."""

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from tsa_helpers import LocalTSA

from seal_diffusion.cli import main
from seal_diffusion.ownership.dispute import Check, ClaimResult, decide
from seal_diffusion.ownership.forgery import forge, public_modules
from seal_diffusion.ownership.genuine import MIN_DIFFERENCE, MIN_SPREAD, check_genuine_pair, weight_measures
from seal_diffusion.core.keyfile import ModuleKey, SealKey
from seal_diffusion.core.passport import pair_problem
from seal_diffusion.ownership.timestamp import write_request
from seal_diffusion.detection.verify import verify_path

PROMPT = "a photo of sks cat"


@pytest.fixture(scope="module")
def owner(owner_training, subject_dir):
    return dict(key=SealKey.load(owner_training["key_path"]), key_path=owner_training["key_path"],
                lora=owner_training["lora_path"], public=public_modules(owner_training["diffusers_path"]),
                pipe=owner_training["pipeline"], data=subject_dir)


def _old_checks_pass(owner, key, tmp_path):
    """What a forgery must pass to be a forgery: the pair checks and exact reproduction of the public file."""
    assert all(pair_problem(mk.passport, mk.passport_p) is None for mk in key.modules.values())
    path = key.save(tmp_path / "forged.sealkey", force=True)
    assert verify_path(path, owner["lora"]).reconstruction_error < 1e-4


def test_owner_is_a_genuine_pair(owner):
    v = check_genuine_pair(owner["key"], owner["pipe"], owner["data"], PROMPT)
    assert v.passed, v.detail
    m = v.measurements
    assert m["difference"] > 1.3 * MIN_DIFFERENCE and m["spread"] > 1.2 * MIN_SPREAD, v.detail


def test_r2_is_measured_once_per_key_base_and_images(owner, monkeypatch, tmp_path):
    """R2 does not depend on the suspect: a second dispute with the same claim reuses the measurement; another key,
    changed base weights or changed subject images are measured again."""
    import shutil

    from seal_diffusion.ownership import genuine

    calls = []
    real = genuine._function_measures
    monkeypatch.setattr(genuine, "_function_measures", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(genuine, "_MEASURED", {})
    key, pipe = owner["key"], owner["pipe"]

    def measure(k, p, d):
        return genuine.function_measures(k, p, d, PROMPT, n_timesteps=1)

    monkeypatch.setattr(genuine, "_BASE_PREDICTIONS", {})
    forwards = []
    hook = pipe.unet.register_forward_hook(lambda *a: forwards.append(1))
    try:
        first = measure(key, pipe, owner["data"])
        first["loss"]["C"] = -1.0  # the caller's copy: the memo is not changed through it
        again = measure(key, pipe, owner["data"])
        assert len(calls) == 1 and again["loss"]["C"] > 0 and again["loss_gap"] == first["loss_gap"]
        assert len(forwards) == 3, "C, C_p and the base, one timestep each"
        other = forge(owner["public"], "flip", seed=3)
        measured = measure(other, pipe, owner["data"])
        assert len(calls) == 2, "another key is measured"
        assert len(forwards) == 5, "…with its own C and C_p, and the base's predictions of the first key"
        assert measured["loss"]["off"] == first["loss"]["off"]
        data = shutil.copytree(owner["data"], tmp_path / "data")
        measure(key, pipe, data)
        assert len(calls) == 3, "other images are measured"
        assert len(forwards) == 8, "other images: the base's predictions too"
    finally:
        hook.remove()
    measure(key, pipe, data)
    assert len(calls) == 3
    next(data.iterdir()).unlink()
    measure(key, pipe, data)
    assert len(calls) == 4, "changed images are measured again"
    weight = pipe.unet.conv_in.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    try:
        changed = measure(key, pipe, owner["data"])
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert len(calls) == 5 and changed["loss"] != again["loss"], "changed base weights are measured again"
    weight = pipe.text_encoder.get_parameter("final_layer_norm.weight")  # the prompt's embedding: the base's too
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        changed = measure(key, pipe, owner["data"])
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert len(calls) == 6 and changed["loss"]["off"] != again["loss"]["off"], "a changed text encoder: measured again"


@pytest.mark.parametrize("mode, kw", [("pad", {}), ("nilpotent", {}), ("nilpotent", {"noise": 0.02}),
                                      ("outside", {}), ("flip", {})])
def test_structural_forgeries_fail_r2(owner, tmp_path, mode, kw):
    """Null-space padding, nilpotent perturbation (exact and ≈ 0), a new adapter outside the LoRA's directions, and
    the weak-direction flip: each reproduces the file and passes the pair checks, and each fails R2's weights."""
    forged = forge(owner["public"], mode, seed=1, **kw)
    _old_checks_pass(owner, forged, tmp_path)
    w = weight_measures(forged)
    assert w["difference"] < MIN_DIFFERENCE or w["spread"] < MIN_SPREAD, (mode, w["difference"], w["spread"])
    v = check_genuine_pair(forged)  # without images: the weight-level verdict is reported
    assert not v.passed and ("changes the LoRA by only" in v.detail or "few directions" in v.detail), v.detail


def test_optimised_second_passport_fails_r2(owner, tmp_path):
    """The reviewers' open question: C̃_p fitted on the subject's images with B̃, Ã fixed (a short fit here;
    benchmarks/bench_genuine.py runs 60 steps and an adaptive variant)."""
    forged = forge(owner["public"], "optimised", seed=2, base=owner["pipe"], data=owner["data"], prompt=PROMPT,
                   steps=15)
    path = forged.save(tmp_path / "forged.sealkey")
    assert verify_path(path, owner["lora"]).reconstruction_error < 1e-4
    v = check_genuine_pair(forged, owner["pipe"], owner["data"], PROMPT)
    assert not v.passed, v.detail
    assert v.measurements["loss_gap"] > 0.25, "a fitted C_p does not work as well as C: the fidelity test rejects it"


def _rebased(key: SealKey, seed: int) -> SealKey:
    """The owner's key in another basis (B·R, Rᵀ·C·Sᵀ, S·A with R, S orthogonal): a second claim that is valid in every
    check — e.g. a stolen key, re-expressed. Only timestamps can order it against the owner's."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for n, mk in key.modules.items():
        while n not in mods or pair_problem(mods[n].passport, mods[n].passport_p):
            r = torch.linalg.qr(torch.randn(key.rank, key.rank, generator=g, dtype=torch.float64))[0]
            s = torch.linalg.qr(torch.randn(key.rank, key.rank, generator=g, dtype=torch.float64))[0]
            mods[n] = ModuleKey((s @ mk.lora_A.double()).float(), (mk.lora_B.double() @ r).float(),
                                (r.T @ mk.passport.double() @ s.T).float(),
                                (r.T @ mk.passport_p.double() @ s.T).float())
    return SealKey(mods, key.rank, key.alpha, key.base_model, key.target_modules)


def test_dispute_earliest_valid_timestamp_wins(owner, tmp_path, tmp_path_factory):
    tsa = LocalTSA(tmp_path_factory.mktemp("tsa"))
    thief_path = _rebased(owner["key"], 5).save(tmp_path / "thief.sealkey")
    forger_path = forge(owner["public"], "flip", seed=3).save(tmp_path / "forger.sealkey")
    owner_path = SealKey.load(owner["key_path"]).save(tmp_path / "owner.sealkey")  # a copy: the fixture's stays
    stamps = {}
    for p in (forger_path, owner_path, thief_path):  # the forger stamps first, the thief last
        stamps[p] = tsa.reply(write_request(p)[0], p.with_suffix(".tsr"))
        time.sleep(1.1)  # genTime has 1 s resolution
    out = tmp_path / "report.json"
    md = tmp_path / "report.md"
    argv = ["dispute", owner["lora"], "--claim", str(forger_path), "--timestamp", str(stamps[forger_path]),
            "--claim", str(owner_path), "--timestamp", str(stamps[owner_path]), "--file", owner["lora"],
            "--claim", str(thief_path), "--timestamp", str(stamps[thief_path]),
            "--ca", str(tsa.ca), "--data", str(owner["data"]), "--prompt", PROMPT, "--json", str(out),
            "--out", str(md)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["winner"] == str(owner_path)
    claims = {c["key"]: c for c in report["claims"]}
    assert set(claims) == {str(forger_path), str(owner_path), str(thief_path)}
    forger_c, owner_c, thief_c = (claims[str(p)] for p in (forger_path, owner_path, thief_path))
    assert not forger_c["valid"] and owner_c["valid"] and thief_c["valid"]
    assert forger_c["timestamp"] < owner_c["timestamp"] < thief_c["timestamp"]
    for c in report["claims"]:
        assert c["timestamp"].endswith("Z")
        assert {"name", "passed", "detail"} <= set(c["checks"][0])
    r2 = next(k for k in forger_c["checks"] if k["name"] == "R2 genuine pair")
    assert not r2["passed"]
    # the flip forgery fails on its weights: its outputs are not measured (they could not make it pass), and says so
    assert "outputs not measured (the weights already fail)" in r2["detail"], r2["detail"]
    assert "function" not in forger_c["measurements"] and "function" in owner_c["measurements"]
    cross = next(k for k in thief_c["checks"] if k["name"].startswith("verify "))
    assert cross["passed"], "the thief's key detects the owner's published file: verify cannot order claims"
    assert "Ownership dispute report" in md.read_text() and str(owner_path) in md.read_text()

    # the same claims without (some) timestamps: the decision rule alone, on the measured results
    results = [ClaimResult(c["key"], c["valid"], [Check(**k) for k in c["checks"]], c["timestamp"], c["commitment"])
               for c in report["claims"]]
    undated = [ClaimResult(r.key, r.valid, r.checks, None, r.commitment) for r in results]
    assert decide(undated)[0] is None and "none has a trusted timestamp" in decide(undated)[1]
    partly = [results[0], undated[1], results[2]]  # the owner undated, the thief (stamped last) dated
    assert decide(partly)[0] == str(thief_path), "an undated claim cannot outrank a dated one"
    assert "cannot outrank" in decide(partly)[1] and str(owner_path) in decide(partly)[1]
    assert decide([undated[1], undated[0]])[0] == str(owner_path), "one valid claim wins without timestamps"
    assert decide([undated[0]])[0] is None
    tie = [results[1], ClaimResult(results[2].key, True, [], results[1].timestamp, "")]
    assert decide(tie)[0] is None and "same timestamp" in decide(tie)[1]

    # a timestamp of another key: that claim loses its date (with the reason), the dispute goes on; the keys are
    # untouched. Without --data no claim shows R2: cannot decide (exit 1), not bad input (exit 2)
    before = owner_path.read_bytes()
    bad = ["dispute", owner["lora"], "--claim", str(owner_path), "--timestamp", str(stamps[thief_path]),
           "--ca", str(tsa.ca), "--json", str(tmp_path / "bad.json")]
    assert main(bad) == 1
    only = json.loads((tmp_path / "bad.json").read_text())["claims"][0]
    assert only["timestamp"] is None and "another commitment" in only["timestamp_problem"]
    assert main(["dispute", owner["lora"], "--claim", str(owner_path), "--timestamp", str(stamps[thief_path])]) == 2, \
        "a timestamp without --ca is the arbiter's bad input"
    with pytest.raises(SystemExit) as usage:  # a --timestamp before any --claim: a usage error
        main(["dispute", owner["lora"], "--timestamp", str(stamps[thief_path])])
    assert usage.value.code == 2
    assert owner_path.read_bytes() == before


def test_app_dispute_handler(owner, tmp_path):
    """The app's handler calls the same library: one claim without subject images → cannot decide, and says why."""
    from ui.app import Workspace
    from ui.dispute_tab import run_dispute

    ws = Workspace()
    try:
        head, md, json_path = run_dispute(owner["lora"], owner["key_path"], ws=ws)
        report = json.loads(open(json_path).read())
        assert report["winner"] is None and "Cannot decide" in head
        assert "no subject images" in md and "claim 1" in md
    finally:
        ws.cleanup()


def test_training_writes_the_timestamp_request(owner_training):
    """The trainer leaves NAME.tsq beside the key: a request for exactly this key's commitment."""
    from rfc3161_client._rust import parse_timestamp_request

    tsq = Path(owner_training["key_path"]).with_suffix(".tsq")
    assert owner_training["timestamp_request"] == str(tsq) and owner_training["timestamp_reply"] is None
    imprint = parse_timestamp_request(tsq.read_bytes()).message_imprint.message
    commitment = SealKey.load(owner_training["key_path"]).commitment()
    assert imprint == hashlib.sha256(bytes.fromhex(commitment)).digest()
