"""Ownership verification: recover the passport from a suspect and test it against the owner's key.

Per module m, with the owner's raw factors B (out×r), A (r×in) and scale s = α/r, the passport is recovered as

    Ĉ_m = pinv(B) · ΔŴ_m · pinv(A) / s

For a LoRA suspect (down D, up U; ΔŴ = U·D) this is computed as (pinv(B)·U)·(D·pinv(A)) — only r×r' and r'×r
products, ΔW is never formed. For a merged model, ΔŴ = W_suspect − W_base. Any product-preserving re-factorisation of
the release (rescale, permute, mix, pad, SVD) leaves Ĉ unchanged.

**The statistic.** C was drawn N(0, σ²) entry-wise, independently of everything a stranger can see. For a suspect that
does not derive from our release, Ĉ_m is independent of C_m, so conditional on Ĉ_m

    z_m = ⟨Ĉ_m, C_m⟩ / (σ · ‖Ĉ_m‖)  ~  N(0, 1)  exactly,

independently across modules (each module has its own C_m). The pooled Z = Σ z_m / √M is N(0, 1) under H0 and
p = P(N(0,1) ≥ Z) is computed in log space (``scipy.stats.norm.logsf``), so p down to 1e-100000 does not underflow.
A copy of the release gives Ĉ_m = C_m and z_m = ‖C_m‖/σ ≈ r, i.e. Z ≈ r·√M (≈ 28 for the tiny default, ≈ 360 for
SD 1.5 at r = 32).

``statistic="contrast"`` uses C_m − C_p,m instead of C_m (normalised by σ√2): still exactly N(0,1) under H0, and it
cancels whatever a same-subject LoRA shares with *both* passports through B and A (which were trained with both), at a
cost of √2 in Z for real copies. See :mod:`seal_diffusion.verify` tests and the robustness report for measurements.

Detection: −log10 p ≥ threshold (default 3.3, p < 5·10⁻⁴, the paper's rule).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from scipy.stats import norm

from .errors import UserError
from .keyfile import SealKey

DEFAULT_THRESHOLD = 3.3
STATISTICS = ("correlation", "contrast")
LN10 = math.log(10.0)


def neg_log10_p(z: float) -> float:
    """−log10 P(N(0,1) ≥ z), exact in log space for any z."""
    return float(-norm.logsf(z) / LN10)


@dataclass
class Suspect:
    """What was found in a suspect file: LoRA factors ``{module: (down, up)}`` or full deltas ``{module: ΔW}``."""

    path: str
    format: str  # kohya | diffusers | checkpoint
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def modules(self) -> set[str]:
        return set(self.factors) | set(self.deltas)


@dataclass
class ModuleResult:
    module: str
    stat: float
    neg_log10_p: float


@dataclass
class VerifyReport:
    detected: bool
    neg_log10_p: float
    threshold: float
    statistic: str
    n_modules: int
    n_modules_missing: int
    n_entries: int
    suspect_format: str
    per_module: list[ModuleResult]
    reconstruction_error: float | None = None
    z: float = 0.0
    suspect: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["per_module"] = [asdict(m) for m in self.per_module]
        return d

    def summary(self) -> str:
        verdict = "DETECTED: this is a copy of your LoRA" if self.detected else "not detected"
        return (f"{self.suspect}: {verdict} (−log10 p = {self.neg_log10_p:.1f}, threshold {self.threshold}; "
                f"{self.n_modules} modules, {self.n_modules_missing} missing)")


# -- recovery -----------------------------------------------------------------------------------------------------------
def _pinvs(key: SealKey) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """pinv(B) (r×out) and pinv(A) (in×r) in float64 for every module of the key."""
    out = {}
    for name, mk in key.modules.items():
        out[name] = (torch.linalg.pinv(mk.lora_B.double()), torch.linalg.pinv(mk.lora_A.double()))
    return out


def recover_passports(key: SealKey, suspect: Suspect, pinvs=None) -> dict[str, torch.Tensor]:
    """Ĉ for every module of the key that the suspect holds (float64, scale removed)."""
    pinvs = pinvs or _pinvs(key)
    recovered = {}
    for name in key.modules:
        pb, pa = pinvs[name]
        if name in suspect.factors:
            down, up = suspect.factors[name]
            c_hat = (pb @ up.double()) @ (down.double() @ pa)
        elif name in suspect.deltas:
            c_hat = pb @ suspect.deltas[name].double() @ pa
        else:
            continue
        recovered[name] = c_hat / key.scale
    return recovered


def _reconstruction_error(key: SealKey, suspect: Suspect) -> float | None:
    """‖ΔŴ − s·B·C·A‖ / ‖s·B·C·A‖ over all shared modules, from r×r traces (no ΔW formed for LoRA suspects)."""
    num = den = 0.0
    for name, mk in key.modules.items():
        x = mk.lora_B.double() * key.scale  # out × r
        y = mk.passport.double() @ mk.lora_A.double()  # r × in
        xy2 = float(torch.trace((x.T @ x) @ (y @ y.T)))
        if name in suspect.factors:
            down, up = (t.double() for t in suspect.factors[name])
            ud2 = float(torch.trace((up.T @ up) @ (down @ down.T)))
            cross = float(torch.trace((x.T @ up) @ (down @ y.T)))
        elif name in suspect.deltas:
            d = suspect.deltas[name].double()
            ud2, cross = float((d * d).sum()), float(torch.trace(x.T @ d @ y.T))
        else:
            continue
        num += max(ud2 - 2 * cross + xy2, 0.0)
        den += xy2
    return math.sqrt(num / den) if den > 0 else None


def passport_std(key: SealKey) -> float:
    """σ of the passports, estimated from all entries of C and C_p (thousands of draws; mean known to be 0)."""
    sq = sum(float((mk.passport.double() ** 2).sum() + (mk.passport_p.double() ** 2).sum()) for mk in key.modules.values())
    n = sum(2 * mk.passport.numel() for mk in key.modules.values())
    return math.sqrt(sq / n)


def verify(
    key: SealKey,
    suspect: Suspect,
    threshold: float = DEFAULT_THRESHOLD,
    statistic: str = "correlation",
    pinvs=None,
) -> VerifyReport:
    """Test whether ``suspect`` carries ``key``'s passport; see the module docstring for the statistic."""
    if statistic not in STATISTICS:
        raise UserError(f"--statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    recovered = recover_passports(key, suspect, pinvs)
    sigma = passport_std(key)
    per_module, zs, n_entries = [], [], 0
    for name, c_hat in recovered.items():
        mk = key.modules[name]
        if statistic == "correlation":
            ref, ref_sigma = mk.passport.double(), sigma
        else:
            ref, ref_sigma = mk.passport.double() - mk.passport_p.double(), sigma * math.sqrt(2.0)
        norm_hat = float(c_hat.norm())
        z = float((c_hat * ref).sum()) / (ref_sigma * norm_hat) if norm_hat > 0 and math.isfinite(norm_hat) else 0.0
        zs.append(z)
        n_entries += c_hat.numel()
        per_module.append(ModuleResult(name, z, neg_log10_p(z)))
    if not zs:
        raise UserError(f"{suspect.path}: holds none of the key's {len(key.modules)} modules (wrong key or base?)")
    z_all = sum(zs) / math.sqrt(len(zs))
    nlp = neg_log10_p(z_all)
    return VerifyReport(
        detected=nlp >= threshold,
        neg_log10_p=nlp,
        threshold=threshold,
        statistic=statistic,
        n_modules=len(zs),
        n_modules_missing=len(key.modules) - len(zs),
        n_entries=n_entries,
        suspect_format=suspect.format,
        per_module=per_module,
        reconstruction_error=_reconstruction_error(key, suspect),
        z=z_all,
        suspect=str(suspect.path),
    )


# -- loading suspects ---------------------------------------------------------------------------------------------------
def _is_checkpoint_path(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "unet").is_dir()
    if path.suffix.lower() != ".safetensors":
        return False
    from .fileio import safe_open_keys

    keys = safe_open_keys(path)
    return any(k.startswith("model.diffusion_model.") for k in keys)


def load_suspect(
    path: str | os.PathLike,
    key: SealKey,
    base: str | None = None,
    *,
    config: str | os.PathLike | None = None,
) -> Suspect:
    """Read a suspect: a LoRA file/folder (either layout) or a full model (then ``base`` gives W_base)."""
    from .lora_file import read_lora

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: suspect not found")
    if _is_checkpoint_path(path):
        if base is None:
            raise UserError(f"{path}: is a full model; pass --base MODEL (the base it was merged into) to verify it")
        return Suspect(str(path), "checkpoint", deltas=merged_deltas(path, base, list(key.modules), config=config))
    lora = read_lora(path)
    return Suspect(str(path), lora.layout, factors=lora.by_module(key.modules))


def _unet_linear_weights(source: str, modules: list[str], config=None) -> dict[str, torch.Tensor]:
    from .base_model import load_pipeline

    unet = load_pipeline(source, config=config).unet
    out = {}
    for name in modules:
        try:
            out[name] = unet.get_submodule(name).weight.detach().float()
        except AttributeError:
            continue
    return out


def merged_deltas(path, base: str, modules: list[str], *, config=None) -> dict[str, torch.Tensor]:
    """ΔW = W_suspect − W_base for each adapted module present in both models."""
    w_s = _unet_linear_weights(str(path), modules, config)
    w_b = _unet_linear_weights(base, modules, config)
    deltas = {}
    for name in modules:
        if name in w_s and name in w_b:
            if w_s[name].shape != w_b[name].shape:
                raise UserError(f"{path}: {name} has shape {tuple(w_s[name].shape)}, base has {tuple(w_b[name].shape)}")
            deltas[name] = w_s[name] - w_b[name]
    return deltas


def verify_path(
    key: SealKey | str | os.PathLike,
    suspect_path: str | os.PathLike,
    *,
    base: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    statistic: str = "correlation",
    config=None,
) -> VerifyReport:
    """Load key and suspect and verify: the one function CLI, UI and scan call."""
    key = key if isinstance(key, SealKey) else SealKey.load(key)
    return verify(key, load_suspect(suspect_path, key, base, config=config), threshold, statistic)
