"""Ownership verification: recover the passport from a suspect and test it against the owner's key.

Per module m, with the owner's raw factors B (out×r), A (r×in) and scale s = α/r, the passport is recovered as

    Ĉ_m = pinv(B) · ΔŴ_m · pinv(A) / s

For a LoRA suspect (down D, up U; ΔŴ = U·D) this is computed as pinv(BᵀB)·(BᵀU)·(DAᵀ)·pinv(AAᵀ) / s — only r×r'
and r'×r products and r×r pseudo-inverses (:class:`PreparedKey`; the numerical core is :mod:`.recovery`), ΔW is
never formed. For a merged model, ΔŴ = W_suspect − W_base. Any product-preserving re-factorisation of the release (rescale, permute, mix, pad, SVD)
leaves Ĉ unchanged.

**The statistic (default: ``contrast``, an exact sign-flip test).** Training uses two random passports; only after
training does a secret per-module coin decide which one is released as C (the other is kept as C_p,
:func:`seal_diffusion.core.passport.release_swap`). For a suspect that does not derive from the release — even a LoRA
trained on the same subject from the same base, which shares structure with *both* passports through B and A — the
labels are therefore a fair coin per module, so the per-module contrast (:func:`contrast_t`)

    d_m = ⟨Ĉ_m, D_m⟩ / (‖D_m‖ · τ_m),  D_m = C_m − C_p,m,  τ_m² = ‖P⊥(Ĉ_m − (C_m + C_p,m)/2)‖² / (r² − 1)

has a sign that is +/− with probability ½, independently across modules, whatever its size; its size does not depend
on the coin (τ_m, the module's own drift measured orthogonally to D_m from the pair's midpoint, is the same for either
labelling), so busy modules of a copy that was trained on count less than quiet ones. Rank ≤ 2 (fewer than
:data:`MIN_T_ENTRIES` entries) keeps d_m = ⟨Ĉ_m, D_m⟩ / (σ√2 · ‖Ĉ_m‖). The p-value is the exact
two-sided randomisation tail 2·min(P(S ≥ Σ d_m), P(S ≤ Σ d_m)), S = Σ ε_m |d_m| over fair signs ε_m, computed by
dynamic programming on a grid that rounds in the conservative direction (:func:`two_sided_neg_log10_p`): a file meant
to be loaded at a negative strength (up-weights negated) has every d_m < 0 and is found too. Nothing about "typical"
LoRAs is assumed. The price is a floor: p ≥ 2^−(M−1) (−log10 p ≤ 14.1 for the tiny default's 48 modules, ≤ 38.2 for
SD 1.5's 128); a real copy has every d_m > 0 and reaches it.

Files used together (several suspects) are loaded at strengths fitted without the coins
(:func:`~seal_diffusion.detection.recovery.fit_strengths`): the criterion is symmetric in C and C_p, so the signs stay fair
coins for any suspect that does not derive from the release, and a release split into parts meant for different
strengths is found.

``statistic="correlation"`` is the textbook test z_m = ⟨Ĉ_m, C_m⟩ / (σ‖Ĉ_m‖), pooled Z = Σ z_m/√M, p = Φ̄(Z) in
log space. It is exactly N(0,1) only when B and A do not depend on the passports (decoy keys); measured on
same-subject innocents it over-fires (z ≈ 5–8), which is why it is not the default. Modules that share a passport (an
image passport repeats its frames) are averaged first (:func:`pool`).

Detection: −log10 p ≥ threshold (default 3.3, p < 5·10⁻⁴, the paper's rule).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.base_model import config_from_base, load_pipeline
from ..defaults import THRESHOLD as DEFAULT_THRESHOLD  # the value --help shows
from ..errors import UserError
from ..fileio import safe_open_keys
from ..core.keyfile import SealKey, check_commitment
from ..formats.lora_file import _add_factors, read_lora
from .recovery import (  # noqa: F401 - re-exported: verify's public numerical API
    LN10, PreparedKey, _recover, fit_strengths, passport_std, prepare, recover_groups, recover_passports,
    sign_flip_neg_log10_p, two_sided_neg_log10_p)

STATISTICS = ("contrast", "correlation")


def neg_log10_p(z: float) -> float:
    """−log10 P(N(0,1) ≥ z), exact in log space for any z."""
    return float(_neg_log10_sf(torch.tensor([z], dtype=torch.float64))[0])


def _neg_log10_sf(z: torch.Tensor) -> torch.Tensor:
    """−log10 P(N(0,1) ≥ z) per entry of a float64 tensor: log Φ(−z), as scipy's ``norm.logsf`` computes it (to
    2e-11 relative over −40…40), without importing scipy.stats, which takes as long as torch itself."""
    return -torch.special.log_ndtr(-z) / LN10


@dataclass
class Suspect:
    """What was found in a suspect file: LoRA factors ``{module: (down, up)}`` or full deltas ``{module: ΔW}``."""

    path: str
    format: str  # kohya | diffusers | checkpoint | combined
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: str = ""  # the key styles and naming seen, e.g. "kohya; LDM names"
    not_tested: list[str] = field(default_factory=list)  # parts present but not tested
    parts: list["Suspect"] = field(default_factory=list)  # the files of a combined suspect, each at strength 1

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
    suspect_layout: str = ""
    not_tested: list[str] = field(default_factory=list)
    max_neg_log10_p: float | None = None  # the floor: the most a file with these modules can reach (contrast)
    suspect_files: list[str] = field(default_factory=list)
    commitment_checked: bool = False
    commitment: str | None = None
    strengths: list[float] | None = None  # files loaded together: the fitted strengths (coin-blind, sign as found)
    sign: int = 1  # −1: the passport was found with the opposite sign (a file meant for a negative strength)

    def to_json(self) -> dict:
        d = asdict(self)
        d["per_module"] = [asdict(m) for m in self.per_module]
        return d

    def summary(self) -> str:
        verdict = "DETECTED: this is a copy of your LoRA" if self.detected else "not detected"
        lines = [f"{self.suspect}: {verdict} (−log10 p = {self.neg_log10_p:.1f}, threshold {self.threshold}; "
                 f"{self.n_modules} modules, {self.n_modules_missing} missing)"]
        if self.suspect_layout:
            lines.append(f"  read as: {self.suspect_layout}")
        if self.n_modules_missing and self.max_neg_log10_p is not None:
            lines.append(f"  floor: with {self.n_modules} of the key's {self.n_modules + self.n_modules_missing} "
                         f"modules the test can reach at most −log10 p = ({self.n_modules} − 1)·log10 2 = "
                         f"{self.max_neg_log10_p:.1f}" + ("" if self.max_neg_log10_p >= self.threshold else
                                                          f" < threshold {self.threshold}: it can never be detected"))
        if self.detected and self.sign < 0 and not self.strengths:
            lines.append("  found with the opposite sign: the file is meant to be loaded at a negative strength")
        if self.strengths and len(self.strengths) > 1:
            lines.append("  files loaded together at the strengths fitted without the coins: "
                         + ", ".join(f"{x:+.3g}" for x in self.strengths))
        if self.not_tested:
            lines.append("  present but not tested: " + "; ".join(self.not_tested))
        lines.append("  key " + (f"matches the published commitment {self.commitment}" if self.commitment_checked
                                 else "NOT checked against a published commitment (pass --commitment HEX): its "
                                      "embedded hash only shows the file is intact, not that it is the key you "
                                      "published"))
        return "\n".join(lines)


# -- the test -----------------------------------------------------------------------------------------------------------
def _group_id(mk, statistic: str) -> bytes:
    ref = mk.passport if statistic == "correlation" else mk.passport - mk.passport_p
    return ref.float().numpy().tobytes()


def pool(zs: list[float], groups: list[bytes]) -> float:
    """Pooled Z: z averaged within modules sharing one reference passport, then Σ/√G over the G groups.

    Random passports never repeat, so every group has one module and Z = Σ z_m / √M, exactly N(0,1) under H0. Modules
    that share a passport (an image passport gives every module the same frame) have dependent z_m; their mean has
    variance ≤ 1 whatever the dependence, so the pooled Z stays conservative.
    """
    sums: dict[bytes, list[float]] = {}
    for z, g in zip(zs, groups):
        sums.setdefault(g, []).append(z)
    means = [sum(v) / len(v) for v in sums.values()]
    return sum(means) / math.sqrt(len(means))


MIN_T_ENTRIES = 9  # passports with fewer entries (rank ≤ 2) leave too few directions to estimate the noise from
T_FLOOR = 1e-3  # τ_m ≥ 10⁻³ × the RMS of D_m: an untouched copy (τ = 0) gets a finite t
# |t_m| is capped here: a module 10 of its own noise units along D is as certain as a module can be. Without it the t of
# near-exact copies spans 10²–10⁵ (the float rounding of a re-save differs by module: measured on a rank-32 key, fp16
# 11.7, bf16 10.8 instead of the floor 14.1), and the sign-flip test's grid (1000 steps of the largest |d|) drops the
# small ones. Measured (benchmarks/bench_drift_statistic.py's suspects): caps 10–50 score the same to ±0.1 everywhere
# else; 5 loses up to 0.9 on thieves.
T_CAP = 10.0


def contrast_t(c_hat: torch.Tensor, contrast: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Per module, the contrast in units of that module's own noise (the ``contrast`` statistic; stacked r×r inputs).

    t_m = ⟨Ĉ_m, D_m⟩ / (‖D_m‖·τ_m), D = C − C_p, with τ_m² = ‖P⊥(Ĉ_m − M_m)‖²/(n − 1): the noise per entry, estimated
    from the n − 1 directions orthogonal to D_m of Ĉ_m's distance to the pair's midpoint M = (C + C_p)/2. M, the
    direction ±D and its orthogonal complement do not change when C and C_p swap, so |t_m| is coin-blind and the
    sign-flip p-value stays exact; for a copy with noise (fine-tuning, a thief's training on top, quantisation) τ_m
    measures how far that module drifted, so quiet modules count more than busy ones. (For a copy at strength s,
    P⊥(sC − M) = (s − 1)·P⊥C: zero for an untouched copy; τ_m is floored at :data:`T_FLOOR` × the RMS of D_m, and
    |t_m| capped at :data:`T_CAP` — both coin-blind.)
    """
    n = contrast[0].numel()
    dn2 = (contrast * contrast).sum((1, 2))
    dnorm = dn2.sqrt()
    x = c_hat - mid
    par = (x * contrast).sum((1, 2)) / torch.where(dnorm > 0, dnorm, 1.0)
    perp2 = ((x * x).sum((1, 2)) - par * par).clamp_min(0.0)
    tau2 = torch.maximum(perp2 / (n - 1), (T_FLOOR ** 2) * dn2 / n)
    t = ((c_hat * contrast).sum((1, 2)) / (dnorm * tau2.sqrt())).clamp(-T_CAP, T_CAP)
    return torch.where(torch.isfinite(t) & (dnorm > 0), t, 0.0)


def verify(
    key: SealKey | PreparedKey,
    suspect: Suspect,
    threshold: float = DEFAULT_THRESHOLD,
    statistic: str = "contrast",
) -> VerifyReport:
    """Test whether ``suspect`` carries ``key``'s passport; see the module docstring for the statistic.

    ``key`` may be a :class:`PreparedKey` (``prepare(key)``) to reuse the key's precomputation across many suspects.
    """
    if statistic not in STATISTICS:
        raise UserError(f"--statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    prep = prepare(key)
    key = prep.key
    strengths = None
    if statistic == "contrast" and len(suspect.parts) > 1:  # files loaded together: fit their strengths, coin-blind
        strengths = fit_strengths(prep, [_recover(prep, part)[0] for part in suspect.parts])
        suspect = combine_suspects(suspect.parts, strengths)
    parts, reconstruction_error = recover_groups(prep, suspect)
    ref_sigma = prep.sigma if statistic == "correlation" else prep.sigma * math.sqrt(2.0)
    refs = prep.references(statistic)
    z_of: dict[str, float] = {}
    for shape, idx, c_hat in parts:  # one batched product per group
        ref = refs[shape] if len(idx) == len(prep.groups[shape]) else refs[shape][idx]
        if statistic == "contrast" and ref[0].numel() >= MIN_T_ENTRIES:
            mid = (prep.c[shape] if len(idx) == len(prep.groups[shape]) else prep.c[shape][idx]) - ref / 2
            z = contrast_t(c_hat, ref, mid)
        else:  # z_m = ⟨Ĉ_m, reference_m⟩ / (σ_ref‖Ĉ_m‖)
            norms = torch.linalg.vector_norm(c_hat, dim=(1, 2))
            ok = (norms > 0) & torch.isfinite(norms)
            z = torch.where(ok, (c_hat * ref).sum((1, 2)) / (ref_sigma * norms), 0.0)
        z_of.update(zip((prep.groups[shape][i] for i in idx), z.tolist()))
    names = [n for n in prep.where if n in z_of]  # key order
    zs = [z_of[n] for n in names]
    n_entries = sum(c_hat.numel() for _, _, c_hat in parts)
    module_nlp = _neg_log10_sf(torch.tensor(zs, dtype=torch.float64)).tolist()  # vectorised: one call, not one per module
    per_module = [ModuleResult(n, z, float(p)) for n, z, p in zip(names, zs, module_nlp)]
    if not zs:
        present = f"; present but not tested: {'; '.join(suspect.not_tested)}" if suspect.not_tested else ""
        raise UserError(f"{suspect.path}: holds none of the key's {len(key.modules)} modules (wrong key or base?)"
                        + present)
    if statistic == "correlation":
        z_all = pool(zs, [_group_id(key.modules[m.module], statistic) for m in per_module])
        nlp = neg_log10_p(z_all)
    else:
        z_norm = math.sqrt(sum(z * z for z in zs))
        z_all = sum(zs) / z_norm if z_norm > 0 else 0.0
        nlp = two_sided_neg_log10_p(zs)
    n = len(zs)
    sign = -1 if statistic == "contrast" and sum(zs) < 0 else 1
    return VerifyReport(
        strengths=[sign * x for x in strengths] if strengths else None,
        sign=sign,
        max_neg_log10_p=(n - 1) * math.log10(2.0) if statistic == "contrast" else None,
        suspect_layout=suspect.layout,
        not_tested=list(suspect.not_tested),
        detected=nlp >= threshold,
        neg_log10_p=nlp,
        threshold=threshold,
        statistic=statistic,
        n_modules=len(zs),
        n_modules_missing=len(key.modules) - len(zs),
        n_entries=n_entries,
        suspect_format=suspect.format,
        per_module=per_module,
        reconstruction_error=reconstruction_error,
        z=z_all,
        suspect=str(suspect.path),
    )


# -- loading suspects ---------------------------------------------------------------------------------------------------
def _is_checkpoint_path(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "unet").is_dir()
    if path.suffix.lower() != ".safetensors":
        return False
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
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: suspect not found")
    if _is_checkpoint_path(path):
        if base is None:
            raise UserError(f"{path}: is a full model; pass --base MODEL (the base it was merged into) to verify it")
        return Suspect(str(path), "checkpoint", deltas=merged_deltas(path, base, list(key.modules), config=config))
    return lora_suspect(read_lora(path), key, str(path))


def lora_suspect(lora, key: SealKey | PreparedKey, name: str | None = None) -> Suspect:
    """The :class:`Suspect` of a read :class:`~seal_diffusion.formats.lora_file.LoraFile`: its layers under the key's names."""
    modules = list(key.key.modules if isinstance(key, PreparedKey) else key.modules)
    layout = "; ".join(x for x in (lora.dialect, lora.naming()) if x)
    return Suspect(name or lora.path, lora.layout, factors=lora.by_module(modules),
                   deltas=lora.deltas_by_module(modules), layout=layout, not_tested=lora.not_tested(modules))


def combine_suspects(suspects: list[Suspect], strengths: list[float] | None = None) -> Suspect:
    """What a frontend runs when all these files are loaded together (each at its strength, default 1): ΔW added
    per module.

    This is the split-LoRA attack's undoing: file A = release + R and file B = −R each look unrelated to the key, but a
    user loads both and gets exactly the release. Low-rank parts are stacked (down rows, up columns; up scaled by the
    strength), so their product is the sum; a module that is a full ΔW in any file is summed as ΔW. Files whose
    layers do not fit together (another model family) are one error. :func:`verify` fits the strengths of the parts
    (``parts``) itself.
    """
    if len(suspects) == 1 and strengths is None:
        return suspects[0]
    strengths = [1.0] * len(suspects) if strengths is None else list(strengths)
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for s in suspects:
        for m in s.modules:
            shape = tuple(s.deltas[m].shape) if m in s.deltas else (s.factors[m][1].shape[0], s.factors[m][0].shape[1])
            if m in shapes and shapes[m][0] != shape:
                raise UserError(f"{shapes[m][1]} and {s.path} cannot be loaded together: {m} is "
                                f"{shapes[m][0][1]}→{shapes[m][0][0]} in one and {shape[1]}→{shape[0]} in the other "
                                "(LoRAs for different model families)")
            shapes.setdefault(m, (shape, s.path))
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    deltas: dict[str, torch.Tensor] = {}
    for s, w in zip(suspects, strengths):
        for m, (down, up) in s.factors.items():
            factors.setdefault(m, []).append((down, up * w) if w != 1.0 else (down, up))
        for m, d in s.deltas.items():
            deltas[m] = deltas[m] + d * w if m in deltas else d * w
    for m in [m for m in factors if m in deltas]:
        deltas[m] = deltas[m] + sum(u.float() @ d.float() for d, u in factors.pop(m))
    return Suspect(
        " + ".join(s.path for s in suspects), "combined",
        factors={m: _add_factors(pairs) for m, pairs in factors.items()}, deltas=deltas,
        layout=" + ".join(dict.fromkeys(s.layout or s.format for s in suspects)),
        not_tested=[f"{Path(s.path).name}: {note}" for s in suspects for note in s.not_tested],
        parts=[p for s in suspects for p in (s.parts or [s])],
    )


def _unet_linear_weights(source: str, modules: list[str], config=None) -> dict[str, torch.Tensor]:
    unet = load_pipeline(source, config=config).unet
    out = {}
    for name in modules:
        try:
            out[name] = unet.get_submodule(name).weight.detach().float()
        except AttributeError:
            continue
    return out


def merged_deltas(path, base: str, modules: list[str], *, config=None) -> dict[str, torch.Tensor]:
    """ΔW = W_suspect − W_base for each adapted module present in both models (a single-file suspect takes its
    configs from ``config``, else from ``base`` when that is ``tiny`` or a diffusers folder)."""
    config = config if config is not None else config_from_base(base)
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
    suspect_path: str | os.PathLike | list,
    *,
    base: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    statistic: str = "contrast",
    config=None,
    commitment: str | None = None,
) -> VerifyReport:
    """Load key and suspect(s) and verify: the one function CLI, UI and scan call.

    Several suspect paths are one suspect: the files a user loads together, their ΔW added before the test
    (:func:`combine_suspects`). ``commitment``: the published commitment the key must match (else an error).
    """
    key = key if isinstance(key, SealKey) else SealKey.load(key)
    if commitment is not None:
        commitment = check_commitment(key, commitment)
    paths = [suspect_path] if isinstance(suspect_path, (str, os.PathLike)) else list(suspect_path)
    if not paths:
        raise UserError("verify: no suspect file given")
    suspect = combine_suspects([load_suspect(p, key, base, config=config) for p in paths])
    report = verify(key, suspect, threshold, statistic)
    report.suspect_files = [str(p) for p in paths]
    report.commitment_checked, report.commitment = commitment is not None, commitment
    return report
