"""Secrets that shape the release: the two attacks of the outside run, performed with the test's own code.

* passphrase only: the thief knows (or guesses) ``--secret`` and holds the public file. Before, one unsalted SHA-256 of
  the passphrase gave the passports, so A and B came back to 3e-8 and a wrong guess showed at once.
* seed: the training ``--seed`` used to draw A's initialisation; with little training A′ = C2·A stays close to
  C2·A_init, so the right seed left a residual of ~0.01 and wrong ones ~0.9 (a 2³² search confirms the seed).
"""

import torch

from seal_diffusion.core.fold import split_passport
from seal_diffusion.core.keyfile import SealKey
from seal_diffusion.formats.lora_file import read_lora
from seal_diffusion.core.passport import (correlation, derive_secret, init_generator, make_passports, parse_kdf_record,
                                     passphrase_warning)

PASSPHRASE = "claim test"  # conftest's owner_training
RANK = 4


def _rebuild_error(public, key, candidates) -> float:
    """The thief's rebuild: A = C2⁻¹·A′ with C2 from a candidate passport (either label); mean relative error of A."""
    errs = []
    for m, (a_pub, _) in public.items():
        true_a = key.modules[m].lora_A.double()
        best = min(
            float((torch.linalg.solve(split_passport(c)[1], a_pub.double()) - true_a).norm() / true_a.norm())
            for c in candidates[m]
        )
        errs.append(best)
    return sum(errs) / len(errs)


def test_passphrase_alone_no_longer_rebuilds_the_key(owner_training):
    key = SealKey.load(owner_training["key_path"])
    public = read_lora(owner_training["lora_path"]).by_module(key.modules)
    names = list(key.modules)

    def attack(guess: str) -> tuple[float, float]:
        cands = {}
        for salt in (b"", b"\0" * 16):  # the old unsalted derivation, and scrypt with a guessed salt
            derived = guess if not salt else derive_secret(guess, salt)
            for m, pair in make_passports(names, RANK, derived).items():
                cands.setdefault(m, []).extend(pair)
        corr = sum(max(abs(correlation(c, key.modules[m].passport)) for c in cands[m]) for m in names) / len(names)
        return _rebuild_error(public, key, cands), corr

    (right_err, right_corr), (wrong_err, wrong_corr) = attack(PASSPHRASE), attack(PASSPHRASE + "!")
    print(f"passphrase-only rebuild: right guess err {right_err:.3f} corr {right_corr:.2f}; "
          f"wrong guess err {wrong_err:.3f} corr {wrong_corr:.2f}")
    assert right_err > 0.5 and wrong_err > 0.5  # was 3e-8 for the right guess
    assert abs(right_err - wrong_err) < 0.25 and right_corr < 0.6 and abs(right_corr - wrong_corr) < 0.15
    # the owner, with the salt from the private key, re-derives exactly the two passports of every module
    salt, params = parse_kdf_record(key.secret_kdf)
    mine = make_passports(names, RANK, derive_secret(PASSPHRASE, salt, params))
    for m in names:
        got = {key.modules[m].passport.numpy().tobytes(), key.modules[m].passport_p.numpy().tobytes()}
        assert got == {mine[m][0].numpy().tobytes(), mine[m][1].numpy().tobytes()}
    assert _rebuild_error(public, key, {m: list(mine[m]) for m in names}) < 1e-4  # ...and with it A (the key's own)


def _residual(public, init) -> float:
    """The seed test: best C2 with A′ ≈ C2·A_init (least squares), mean relative residual."""
    out = []
    for m, (a_pub, _) in public.items():
        a0 = init[m].double()
        c2 = a_pub.double() @ torch.linalg.pinv(a0)
        out.append(float((a_pub.double() - c2 @ a0).norm() / a_pub.double().norm()))
    return sum(out) / len(out)


def _inits(unet, generator=None, seed=None) -> dict:
    from seal_diffusion.core.network import SealNetwork
    from seal_diffusion.training.data import derived_seed

    if seed is not None:  # what the trainer did before: the global RNG seeded from --seed
        torch.manual_seed(derived_seed(seed, "init") % (2**32))
    net = SealNetwork(unet, RANK, None, generator=generator)
    factors = {m: a for m, (a, _) in net.factors().items()}
    net.remove()
    return factors


def test_training_seed_is_not_confirmed_by_the_release(owner_training):
    key = SealKey.load(owner_training["key_path"])
    public = read_lora(owner_training["lora_path"]).by_module(key.modules)
    unet = owner_training["pipeline"].unet
    by_seed = {s: _residual(public, _inits(unet, seed=s)) for s in (0, 1, 2, 3)}  # the run used --seed 0
    salt, params = parse_kdf_record(key.secret_kdf)
    owner = _residual(public, _inits(unet, generator=init_generator(derive_secret(PASSPHRASE, salt, params))))
    print(f"seed residuals {by_seed}; with the secret {owner:.4f}")
    wrong = [by_seed[s] for s in (1, 2, 3)]
    assert owner < min(wrong) - 0.2  # the statistic works (0.54 vs 0.94 here; 0.0075 at the default lr 1e-5)...
    assert by_seed[0] > 0.5 and abs(by_seed[0] - sum(wrong) / 3) < 0.1  # ...but the seed no longer gives it


def test_secret_stays_private_and_short_passphrases_warn(owner_training):
    key = SealKey.load(owner_training["key_path"])
    salt_hex = key.secret_kdf.rsplit("salt=", 1)[1]
    assert key.secret_kdf.startswith("scrypt:n=32768,r=8,p=1:salt=") and len(salt_hex) == 32
    for public in (owner_training["lora_path"], owner_training["diffusers_path"]):
        data = open(public, "rb").read()
        assert salt_hex.encode() not in data and b"scrypt" not in data and PASSPHRASE.encode() not in data
    assert "short" in passphrase_warning(PASSPHRASE) and passphrase_warning("correct horse battery staple") is None
    a, b = derive_secret("x" * 20, b"1" * 16), derive_secret("x" * 20, b"2" * 16)
    assert a != b and len(a) == 32  # salted
