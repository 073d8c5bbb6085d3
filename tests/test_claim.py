"""The claim check: the real owner's key passes; forged second passports and trivial claims fail."""

import pytest
import torch

from seal_diffusion.ownership.claim import check_claim, forge_passport_p
from seal_diffusion.core.keyfile import ModuleKey, SealKey
from seal_diffusion.training import parse_args, train


@pytest.fixture(scope="module")
def owner_run(owner_training, subject_dir):
    return dict(key=SealKey.load(owner_training["key_path"]), lora=owner_training["lora_path"],
                base=owner_training["pipeline"], data=subject_dir)


def _check(run, key, **kw):
    return check_claim(key, run["lora"], base=run["base"], data=run["data"], **kw)


def test_owner_claim_is_accepted_with_commitment(owner_run):
    key = owner_run["key"]
    report = _check(owner_run, key, commitment=key.commitment())
    assert report.accepted, report.summary()
    m = report.measurements
    assert m["reconstruction_error"] < 1e-5
    assert m["loss"]["C"] < m["loss"]["off"] and m["loss_gap"] < 0.25


@pytest.mark.parametrize("mode, gamma", [("random", 0.0), ("identity", 0.0), ("gamma", 0.9)])
def test_forged_second_passports_fail(owner_run, mode, gamma):
    forged = forge_passport_p(owner_run["key"], mode, gamma, seed=3)
    report = _check(owner_run, forged)
    assert not report.accepted, report.summary()


def test_r2_is_measured_once_per_passport_weights(owner_run, monkeypatch):
    """R2's losses and images depend on (A, B, one passport), the base and the images: checking the same key again
    measures nothing; a key that differs only in C_p measures only C_p (one loss, one image batch)."""
    from seal_diffusion.detection.image_sampler import challenge_scheduler
    from seal_diffusion.ownership import claim

    calls = []
    real_loss, real_generate = claim.heldout_denoising_loss, claim.generate
    monkeypatch.setattr(claim, "heldout_denoising_loss", lambda *a, **k: calls.append(a[4]) or real_loss(*a, **k))
    monkeypatch.setattr(claim, "generate", lambda *a, **k: calls.append("images") or real_generate(*a, **k))
    first = _check(owner_run, owner_run["key"]).measurements
    calls.clear()
    again = _check(owner_run, owner_run["key"]).measurements
    assert calls == [] and again["loss"] == first["loss"] and again["ssim_C_Cp"] == first["ssim_C_Cp"]
    forged = forge_passport_p(owner_run["key"], "gamma", 0.5, seed=17)
    report = _check(owner_run, forged)
    assert sorted(calls) == ["C_p", "images"], calls
    m = report.measurements
    assert m["loss"]["C"] == first["loss"]["C"] and m["loss"]["off"] == first["loss"]["off"]
    assert m["loss"]["C_p"] != first["loss"]["C_p"] and m["ssim_C_Cp"] != first["ssim_C_Cp"]
    calls.clear()
    with challenge_scheduler(owner_run["base"], "DDIMScheduler"):  # the images depend on the sampler, the losses not
        _check(owner_run, owner_run["key"])
    assert calls == ["images", "images"], calls


def test_wrong_commitment_and_trivial_claims_fail(owner_run):
    key = owner_run["key"]
    report = _check(owner_run, key, commitment="0" * 64)
    assert not report.accepted and any(c.name == "commitment" and not c.passed for c in report.checks)
    # the known hole: C = C_p = I with B' A' (a forger's factorisation of the release) reproduces the file exactly
    from seal_diffusion.core.export import public_factors

    eye = torch.eye(key.rank)
    trivial = SealKey({n: ModuleKey(a, b / key.scale, eye, eye) for n, (a, b) in public_factors(key).items()},
                      key.rank, key.alpha)
    report = _check(owner_run, trivial)
    assert not report.accepted
    assert next(c for c in report.checks if c.name == "passports").passed is False
    assert next(c for c in report.checks if c.name.startswith("R1")).passed is True


def test_finetune_attack_keeps_watermark_and_starts_from_the_file(owner_run, tmp_path):
    """Continued plain-LoRA training from the release, as long as the original run: still detected."""
    from seal_diffusion.formats.lora_file import read_lora
    from seal_diffusion.attacks.finetune import finetune_lora
    from seal_diffusion.detection.verify import verify_path

    out = finetune_lora(owner_run["lora"], tmp_path / "ft.safetensors", data=owner_run["data"], steps=60,
                        learning_rate=2e-3, seed=5)
    tuned, orig = read_lora(out), read_lora(owner_run["lora"])
    changed = [s for s in orig.entries if not torch.allclose(tuned.entries[s][1], orig.entries[s][1])]
    assert changed, "fine-tuning must change the weights"
    report = verify_path(owner_run["key"], out)
    assert report.detected, report.summary()
    assert report.reconstruction_error > 1e-3
    zero = finetune_lora(owner_run["lora"], tmp_path / "ft1.safetensors", data=owner_run["data"], steps=1,
                         learning_rate=1e-12, seed=5)
    assert verify_path(owner_run["key"], zero).reconstruction_error < 1e-3, "--init_lora starts from the file"


@pytest.mark.parametrize("method, seed", [("lora", 11), ("seal", 12)])
def test_same_subject_innocents_are_not_accused(owner_run, tmp_path, method, seed):
    """Independent LoRAs of the same subject from the same base share structure with the owner's: the exact
    sign-flip test must still not accuse them."""
    from seal_diffusion.detection.verify import verify_path

    args = parse_args(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", str(owner_run["data"]),
                       "--instance_prompt", "a photo of sks cat", "--output_dir", str(tmp_path), "--output_name",
                       "other", "--method", method, "--rank", "4", "--max_train_steps", "60",
                       "--learning_rate", "2e-3", "--seed", str(seed), "--cache_latents", "--resolution", "32"])
    result = train(args)
    result["network"].remove()
    report = verify_path(owner_run["key"], result["lora_path"])
    assert not report.detected, report.summary()
    corr = verify_path(owner_run["key"], result["lora_path"], statistic="correlation")
    assert corr.z > report.z, "the correlation statistic leans towards same-subject innocents (why it is not used)"
