"""Passports: the secret, non-trainable r×r matrices C and C_p that sit between LoRA's factors (ΔW = B·C·A).

Every adapted module gets its own pair. Two sources:

* ``random`` — C ~ N(0, σ²) entry-wise (the paper's SEAL†), derived deterministically from a 32-byte secret and the
  module name: SHA-256(secret, module, which, attempt) seeds a numpy PCG64 generator, so the same secret gives the same
  passports on every machine and every accelerate process.
* ``image:PATH`` — the artist's logo or signature: grayscale, centre crop, resize to r×r, mapped to [−1, 1] and scaled
  by σ. A multi-frame image (GIF/WebP) gives module i frame i mod N. C_p is then random (from the secret).

**The secret.** By default 32 bytes from the OS (:func:`new_secret`, ``secrets``), kept nowhere but in the passports.
A passphrase (``--secret``) is stretched with scrypt (memory-hard, :data:`SCRYPT`) and a random 16-byte salt that is
stored only in the private key and private checkpoints (:func:`derive_secret`, :func:`kdf_record`): the passphrase
alone — once one unsalted SHA-256 away from the passports — now gives nothing, and a guess cannot be tested against
the public file. The same secret also draws A's initialisation (:func:`init_generator`), so a public or guessed
training ``--seed`` cannot be confirmed from the release.

C_p is drawn independently of C. A pair is refused when C_p equals C, is identity-like, or correlates strongly with C
(|corr| > 0.5): those would make the second passport worthless as proof (the paper's claim check has exactly this hole,
C = C_p = I passes trivially). Random draws that hit these cases are redrawn deterministically (next ``attempt``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

from ..errors import UserError

MAX_CORRELATION = 0.5
RANDOM_SECRET_BYTES = 32
SALT_BYTES = 16
SCRYPT = {"n": 2**15, "r": 8, "p": 1}  # 32 MiB and ~0.1 s per derivation (OWASP's minimum is n=2^17 r=8 p=1 for
# password storage; a passphrase here is tried once per training run, so the cost stays modest)
MIN_PASSPHRASE_CHARS = 16


def new_secret() -> bytes:
    """32 random bytes from the OS: the default secret when the user gives none (kept nowhere but in the passports)."""
    return secrets.token_bytes(RANDOM_SECRET_BYTES)


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def derive_secret(passphrase: str, salt: bytes, params: dict | None = None) -> bytes:
    """scrypt(passphrase, salt) → 32 bytes: the secret a passphrase stands for (memory-hard, salted)."""
    if not passphrase:
        raise UserError("--secret: empty passphrase")
    if len(salt) < 8:
        raise UserError("secret salt: too short")
    p = {**SCRYPT, **(params or {})}
    return hashlib.scrypt(passphrase.encode("utf-8"), salt=salt, n=p["n"], r=p["r"], p=p["p"],
                          maxmem=256 * p["r"] * p["n"] + (1 << 20), dklen=32)


def kdf_record(salt: bytes, params: dict | None = None) -> str:
    """What the private key stores to re-derive the secret from the passphrase: ``scrypt:n=…,r=…,p=…:salt=HEX``."""
    p = {**SCRYPT, **(params or {})}
    return f"scrypt:n={p['n']},r={p['r']},p={p['p']}:salt={salt.hex()}"


def parse_kdf_record(record: str) -> tuple[bytes, dict]:
    """(salt, scrypt parameters) of a :func:`kdf_record` string; :class:`UserError` when malformed."""
    try:
        kind, params, salt = record.split(":")
        if kind != "scrypt" or not salt.startswith("salt="):
            raise ValueError(record)
        values = {k: int(v) for k, v in (item.split("=") for item in params.split(","))}
        return bytes.fromhex(salt[len("salt="):]), {k: values[k] for k in ("n", "r", "p")}
    except (ValueError, KeyError) as exc:
        raise UserError(f"secret derivation record {record!r} is malformed") from exc


def passphrase_warning(passphrase: str) -> str | None:
    """A warning for a short passphrase (None when it is long enough)."""
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        return (f"--secret: a passphrase of {len(passphrase)} characters is short (use ≥ {MIN_PASSPHRASE_CHARS}, e.g. "
                "five random words). The passports come from scrypt(passphrase, a random salt kept in the private "
                "key), but anyone who gets the key and guesses the passphrase can confirm the guess; or leave "
                "--secret out: 32 random bytes from the OS are used")
    return None


def owner_secret(passphrase: str | None, checkpoint_state: dict | None, warn) -> tuple[bytes, str]:
    """The trainer's (32-byte secret, private salt record): OS randomness by default; scrypt(passphrase, salt) with
    ``--secret`` (a fresh salt, or the checkpoint's when resuming). Never from anything a user may publish (the seed)."""
    if passphrase is None:
        return new_secret(), ""
    why = passphrase_warning(passphrase)
    if why:
        warn(why)
    record = (checkpoint_state or {}).get("secret_kdf") or ""
    if checkpoint_state is not None and not record:
        raise UserError("--secret: the checkpoint holds no passphrase salt (trained without --secret, or by an older "
                        "version); resume without --secret, the passports come from the checkpoint")
    salt, params = parse_kdf_record(record) if record else (new_salt(), None)
    return derive_secret(passphrase, salt, params), kdf_record(salt, params)


def init_generator(secret: bytes) -> torch.Generator:
    """The generator of A's initialisation, drawn from the secret (not from the public or guessable ``--seed``)."""
    digest = hashlib.sha256(b"seal-init\0" + secret).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def secret_bytes(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        if not secret:
            raise UserError("secret: empty")
        return secret
    if not secret:
        raise UserError("--secret: empty passphrase")
    return secret.encode("utf-8")


def _rng(secret: bytes, module: str, which: str, attempt: int) -> np.random.Generator:
    digest = hashlib.sha256(b"seal-passport\0" + secret + b"\0" + module.encode() + b"\0" + which.encode()
                            + b"\0" + str(attempt).encode()).digest()
    return np.random.Generator(np.random.PCG64(np.frombuffer(digest, dtype=np.uint32)))


def random_passport(secret: bytes, module: str, which: str, rank: int, std: float = 1.0, attempt: int = 0) -> torch.Tensor:
    """An r×r N(0, std²) matrix determined by (secret, module, which ∈ {C, C_p}, attempt)."""
    values = _rng(secret, module, which, attempt).standard_normal((rank, rank)) * std
    return torch.from_numpy(values.astype(np.float32))


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of the entries of two matrices (nan when either is constant)."""
    a = x.double().flatten() - x.double().mean()
    b = y.double().flatten() - y.double().mean()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else float("nan")


def passport_problem(p: torch.Tensor) -> str | None:
    """Why ``p`` is unusable as a passport (flat, non-finite, singular, identity-like), or None."""
    if not torch.isfinite(p).all():
        return "has non-finite entries"
    if p.shape[0] < 2:
        return "is 1×1: SEAL needs rank ≥ 2"
    if float(p.double().std()) == 0.0:
        return "is flat (all entries equal)"
    s = torch.linalg.svdvals(p.double())
    if float(s[-1]) <= 1e-6 * float(s[0]):
        return f"is singular (numerical rank {int((s > 1e-6 * s[0]).sum())} of {p.shape[0]})"
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    if abs(correlation(p, eye)) > MAX_CORRELATION:
        return f"is identity-like (|corr| with I = {abs(correlation(p, eye)):.2f} > {MAX_CORRELATION})"
    return None


def pair_problem(c: torch.Tensor, c_p: torch.Tensor) -> str | None:
    """Why (C, C_p) is not an acceptable pair, or None."""
    for label, p in (("C", c), ("C_p", c_p)):
        why = passport_problem(p)
        if why:
            return f"{label} {why}"
    if torch.equal(c, c_p):
        return "C_p equals C"
    corr = correlation(c, c_p)
    if abs(corr) > MAX_CORRELATION:
        return f"C_p correlates with C (|corr| = {abs(corr):.2f} > {MAX_CORRELATION})"
    return None


def release_swap(c: torch.Tensor, c_p: torch.Tensor) -> bool:
    """The per-module coin that decides, *after* training, which of the two trained passports is released.

    A hash of both passports (secret-derived, so unpredictable to anyone else). Because the coin does not depend on
    the training trajectory, a suspect that does not derive from the release cannot tell released from kept: the sign
    of its contrast ⟨Ĉ, C − C_p⟩ is then a fair coin per module, which makes the verifier's sign-flip test exact.
    """
    digest = hashlib.sha256(b"seal-release\0" + c.float().numpy().tobytes() + c_p.float().numpy().tobytes()).digest()
    return bool(digest[0] & 1)


def load_passport_frames(path: str | os.PathLike, rank: int, std: float = 1.0) -> list[torch.Tensor]:
    """The r×r passports an image gives: grayscale, centre crop, resize, x/127.5 − 1, times ``std``; one per frame."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: passport image not found")
    try:
        with Image.open(path) as im:
            frames = []
            for frame in ImageSequence.Iterator(im):
                g = frame.convert("L")
                side = min(g.size)
                left, top = (g.width - side) // 2, (g.height - side) // 2
                g = g.crop((left, top, left + side, top + side)).resize((rank, rank), Image.Resampling.LANCZOS)
                arr = np.asarray(g, dtype=np.float64) / 127.5 - 1.0
                frames.append(torch.from_numpy((arr * std).astype(np.float32)))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable image for a passport ({exc})") from exc
    if not frames:
        raise UserError(f"{path}: image has no frames")
    return frames


def make_passports(
    module_names: list[str],
    rank: int,
    secret: str | bytes,
    source: str = "random",
    std: float = 1.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """C and C_p for each module, in ``module_names`` order (which fixes the frame of an image passport).

    ``source`` is ``random`` or ``image:PATH``. The same arguments always give the same passports.
    """
    if rank < 2:
        raise UserError(f"--rank {rank}: SEAL needs rank ≥ 2 (a 1×1 passport cannot be told apart from a scale)")
    if not (std > 0 and np.isfinite(std)):
        raise UserError(f"--passport_std {std}: must be a positive number")
    key = secret_bytes(secret)
    frames = None
    if source.startswith("image:"):
        image_path = source[len("image:"):]
        frames = load_passport_frames(image_path, rank, std)
    elif source != "random":
        raise UserError(f"--passport_source {source!r}: expected 'random' or 'image:PATH'")

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, name in enumerate(module_names):
        if frames is not None:
            c = frames[i % len(frames)]
            why = passport_problem(c)
            if why:
                raise UserError(
                    f"{image_path}: frame {i % len(frames)} resized to {rank}×{rank} {why}; "
                    "use an image with more detail (or a random passport)"
                )
        else:
            c = _draw_valid(key, name, "C", rank, std, lambda p: passport_problem(p))
        c_p = _draw_valid(key, name, "C_p", rank, std, lambda p, c=c: pair_problem(c, p))
        out[name] = (c, c_p)
    return out


def _draw_valid(key: bytes, name: str, which: str, rank: int, std: float, problem) -> torch.Tensor:
    for attempt in range(1000):
        p = random_passport(key, name, which, rank, std, attempt)
        if problem(p) is None:
            return p
    raise RuntimeError(f"{name}: could not draw an acceptable {which} passport")  # never happens for rank ≥ 2
