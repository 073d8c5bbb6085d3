"""The owner's private key file (``.sealkey``): safetensors with raw A, B, C, C_p per module.

Layout (``../shared/spec.md``): for each adapted module ``m`` (diffusers module path) the tensors ``m.lora_A`` (r×in),
``m.lora_B`` (out×r), ``m.passport`` (C) and ``m.passport_p`` (C_p), all float32; string metadata ``format=sealkey``,
``version``, ``rank``, ``alpha``, ``base_model``, ``target_modules`` (JSON list), ``passport_source``, ``commitment``,
``created``, ``architecture`` (kohya's ``ss_base_model_version`` value: ``sd_v1`` or ``sdxl_base_v1-0``; keys
written before it existed are ``sd_v1``) and, for a passphrase run, ``secret_kdf`` (the scrypt salt: private, like
everything here). ΔW of module m with passport C_t is ``(alpha/rank) · lora_B @ C_t @ lora_A``.

The **commitment** is SHA-256 over a header (``sealkey-commitment-v1``, rank, alpha) followed by every tensor in sorted
name order (name, dtype, shape, raw little-endian bytes). Publish it with the LoRA *before* release: a later claimant
cannot produce a key with the same hash, and any change to the key (tampering, a flipped bit) is caught on load.

The file is written atomically, and never over an existing key unless ``force=True`` (CLI ``--force``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..models.base_model import is_sdxl
from ..errors import UserError
from ..fileio import load_safetensors, save_safetensors_atomic

FORMAT = "sealkey"
VERSION = "1"
TENSOR_FIELDS = ("lora_A", "lora_B", "passport", "passport_p")


@dataclass
class ModuleKey:
    lora_A: torch.Tensor  # r × in
    lora_B: torch.Tensor  # out × r
    passport: torch.Tensor  # r × r, C
    passport_p: torch.Tensor  # r × r, C_p


@dataclass
class SealKey:
    modules: dict[str, ModuleKey]
    rank: int
    alpha: float
    base_model: str = "unknown"
    target_modules: list[str] = field(default_factory=list)
    passport_source: str = "random"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    version: str = VERSION
    architecture: str = "sd_v1"  # sd_v1 | sdxl_base_v1-0 (kohya's ss_base_model_version values)
    secret_kdf: str = ""  # passphrase runs: "scrypt:n=…,r=…,p=…:salt=HEX" (private; see passport.derive_secret)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_network(cls, network, base_model: str, passport_source: str) -> "SealKey":
        """The key of a trained :class:`~seal_diffusion.core.network.SealNetwork` (raw factors + both passports)."""
        passports = network.passports()
        modules = {
            name: ModuleKey(a.contiguous(), b.contiguous(), passports[name][0].float().contiguous(),
                            passports[name][1].float().contiguous())
            for name, (a, b) in network.factors().items()
        }

        arch = "sdxl_base_v1-0" if is_sdxl(network.unet) else "sd_v1"
        return cls(modules, network.rank, network.alpha, base_model, list(network.all_targets), passport_source,
                   architecture=arch, secret_kdf=getattr(network, "secret_kdf", ""))

    def tensors(self, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """The file's tensors (float32, CPU, contiguous); ``copy=False`` skips the defensive clone (read-only use)."""
        out = {}
        for name, mk in self.modules.items():
            for f in TENSOR_FIELDS:
                t = getattr(mk, f).detach().float().cpu().contiguous()
                out[f"{name}.{f}"] = t.clone() if copy else t
        return out

    def commitment(self) -> str:
        """SHA-256 (hex) over the canonical tensors; see the module docstring."""
        h = hashlib.sha256(f"sealkey-commitment-v1\0rank={self.rank}\0alpha={self.alpha!r}\0".encode())
        for name, t in sorted(self.tensors(copy=False).items()):
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.numpy().astype("<f4", copy=False).tobytes())
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "version": self.version,
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "base_model": self.base_model,
            "target_modules": json.dumps(list(self.target_modules)),
            "passport_source": self.passport_source,
            "commitment": self.commitment(),
            "created": self.created,
            "architecture": self.architecture,
            **({"secret_kdf": self.secret_kdf} if self.secret_kdf else {}),
        }

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write atomically; refuses to replace an existing file unless ``force``."""
        return save_safetensors_atomic(self.tensors(), path, self.metadata(), overwrite=force, what="key file",
                                       private=True)

    def delta_factors(self, name: str, which: str = "C") -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B_eff) with ΔW = B_eff @ A_eff for passport ``which`` ∈ {C, C_p, identity}; scale in B_eff."""
        mk = self.modules[name]
        c = {"C": mk.passport, "C_p": mk.passport_p, "identity": None}[which]
        a = mk.lora_A if c is None else c @ mk.lora_A
        return a, mk.lora_B * self.scale

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SealKey":
        """Read and check a key file: format, completeness, shapes, and the commitment (tampering)."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path}: is a folder; expected a key file (.sealkey)")
        tensors, meta = load_safetensors(path, what="key file")
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: not a SEAL key file (metadata format={meta.get('format')!r}, expected 'sealkey')")
        if meta.get("version") != VERSION:
            raise UserError(f"{path}: key file version {meta.get('version')!r} is not supported (expected {VERSION})")
        try:
            rank = int(meta["rank"])
            alpha = float(meta["alpha"])
            targets = json.loads(meta.get("target_modules", "[]"))
            stored_commitment = meta["commitment"]
        except (KeyError, ValueError) as exc:
            raise UserError(f"{path}: key file metadata is incomplete or malformed ({exc})") from exc
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, fld = key.rpartition(".")
            if fld not in TENSOR_FIELDS or not name:
                raise UserError(f"{path}: unexpected tensor {key!r} in key file")
            grouped.setdefault(name, {})[fld] = t
        if not grouped:
            raise UserError(f"{path}: key file holds no modules")
        modules = {}
        for name, parts in grouped.items():
            missing = [f for f in TENSOR_FIELDS if f not in parts]
            if missing:
                raise UserError(f"{path}: module {name} lacks {', '.join(missing)}")
            a, b, c, cp = (parts[f] for f in TENSOR_FIELDS)
            if not (a.dim() == b.dim() == c.dim() == cp.dim() == 2 and a.shape[0] == rank and b.shape[1] == rank
                    and tuple(c.shape) == (rank, rank) == tuple(cp.shape)):
                raise UserError(
                    f"{path}: module {name} has shapes A{tuple(a.shape)} B{tuple(b.shape)} C{tuple(c.shape)} "
                    f"C_p{tuple(cp.shape)}, inconsistent with rank {rank}"
                )
            modules[name] = ModuleKey(a.float(), b.float(), c.float(), cp.float())
        key = cls(modules, rank, alpha, meta.get("base_model", "unknown"), targets,
                  meta.get("passport_source", "random"), meta.get("created", ""), meta["version"],
                  meta.get("architecture", "sd_v1"), meta.get("secret_kdf", ""))
        if key.commitment() != stored_commitment:
            raise UserError(f"{path}: key file commitment does not match its contents (tampered or corrupted)")
        return key


def normalise_commitment(published: str, what: str = "--commitment") -> str:
    """64 lowercase hex digits (``sha256:`` prefix and surrounding space allowed), else :class:`UserError`."""
    value = published.strip().lower()
    value = value[len("sha256:"):] if value.startswith("sha256:") else value
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise UserError(f"{what} {published!r}: expected the 64 hex digits printed by 'seal-diffusion commitment'")
    return value


def check_commitment(key: SealKey, published: str, what: str = "--commitment") -> str:
    """Refuse ``key`` unless its commitment equals ``published``; returns the normalised hex.

    The hash embedded in a key file only shows the file is intact: whoever edits the tensors can recompute it. A
    commitment published *before* a dispute (with the LoRA, or timestamped) is what ties a key to its owner.
    """
    value = normalise_commitment(published, what)
    actual = key.commitment()
    if not hmac.compare_digest(actual, value):
        raise UserError(f"{what}: the key does not match the published commitment {value[:16]}… (its own is "
                        f"{actual[:16]}…): this is not the key that was committed to (edited, or another key)")
    return value


def check_commitments(keys: dict[str, SealKey], published: list[str] | None,
                      what: str = "--commitment") -> dict[str, str | None]:
    """Several keys: each must match one of the ``published`` commitments. ``{name: commitment or None}``."""
    if not published:
        return {name: None for name in keys}
    values = [normalise_commitment(p, what) for p in published]
    out = {}
    for name, key in keys.items():
        actual = key.commitment()
        match = next((v for v in values if hmac.compare_digest(actual, v)), None)
        if match is None:
            raise UserError(f"{name}: the key matches none of the published commitments given with {what} "
                            f"(its own is {actual[:16]}…): edited, or not the key that was committed to")
        out[name] = match
    return out
