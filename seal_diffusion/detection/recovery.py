"""The numerical core of verification: recover Ĉ per module, and the exact sign-flip p-value.

Per module m, with the owner's raw factors B (out×r), A (r×in) and scale s = α/r, the passport is recovered as

    Ĉ_m = pinv(B) · ΔŴ_m · pinv(A) / s

For a LoRA suspect (down D, up U; ΔŴ = U·D) this is pinv(BᵀB)·(BᵀU)·(DAᵀ)·pinv(AAᵀ) / s: only r×r' and r'×r
products and r×r pseudo-inverses, ΔW is never formed. For a merged model, ΔŴ = W_suspect − W_base.

Speed (a full SDXL LoRA has 560 modules, ~46 M factor entries on each side): every product is float64 (the
reconstruction error is a difference of large sums that cancel for a copy, so float32 sums would leave ~1e-3 of
noise), but nothing is converted to float64 as a whole: modules are stacked per shape in chunks of a few MiB
(:data:`CHUNK_BYTES`), converted into one reused buffer and multiplied there, so memory stays small and there are no
fresh pages to fault in per call. B and U share one buffer ([B U], out × (r+r')), so BᵀU and UᵀU are one product;
likewise [A; D]. The r×r pseudo-inverses come from Cholesky where that is provably the same matrix.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..errors import UserError
from ..core.keyfile import SealKey

LN10 = math.log(10.0)
CHUNK_BYTES = 4 << 20  # float64 workspace per batched product; larger buffers are slower (cache) and fault pages in
_COND_MAX = 1e8  # Cholesky inverse used when cond(G) ≤ this (then pinv = inv, and both agree to ~cond·eps)


class PreparedKey:
    """What verification needs from a key, computed once (``scan`` and the robustness report reuse it per file).

    Modules are grouped by shape (SDXL's 560 modules come in 4 shapes). Per group, in float64: the Gram matrices
    BᵀB and AAᵀ, their pseudo-inverses G_B = pinv(BᵀB), G_A = pinv(AAᵀ) (so that pinv(B) = G_B·Bᵀ and
    pinv(A) = Aᵀ·G_A — identities that hold for any matrix), C, the reference passport of each statistic, and
    ‖s·B·C·A‖² = s²·tr(BᵀB·C·AAᵀ·Cᵀ). B and A themselves are kept as the key's tensors (no float64 copy).

    The Gram matrices of a group are computed on first use (:meth:`grams`), by the first recovery that needs them:
    when the suspect holds the whole group, [B U]ᵀ[B U] gives BᵀB together with BᵀU and UᵀU for the price of the
    latter two alone, so a one-off ``verify`` does no separate key pass. :meth:`ready` computes them all up front.
    """

    def __init__(self, key: SealKey):
        self.groups: dict[tuple[int, int], list[str]] = {}
        for name, mk in key.modules.items():
            self.groups.setdefault((mk.lora_B.shape[0], mk.lora_A.shape[1]), []).append(name)
        self.where = {n: (shape, i) for shape, names in self.groups.items() for i, n in enumerate(names)}
        self.b = {shape: [key.modules[n].lora_B for n in names] for shape, names in self.groups.items()}  # out × r
        self.a = {shape: [key.modules[n].lora_A for n in names] for shape, names in self.groups.items()}  # r × in
        self._grams: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # shared with with_passports copies
        self._set_passports(key)

    def _set_passports(self, key: SealKey) -> None:
        self.key, self.scale = key, key.scale
        self.c, self.contrast, self._release_sq = {}, {}, {}
        sq = 0.0
        for shape, names in self.groups.items():
            c = _stack64([key.modules[n].passport for n in names])
            c_p = _stack64([key.modules[n].passport_p for n in names])
            self.c[shape], self.contrast[shape] = c, c - c_p
            sq += float((c * c).sum() + (c_p * c_p).sum())
        self.sigma = math.sqrt(sq / sum(2 * c.numel() for c in self.c.values()))  # = passport_std(key)

    def with_passports(self, key: SealKey) -> "PreparedKey":
        """The same factors (B, A must be this key's) with ``key``'s passports: decoy keys without redoing pinvs."""
        other = copy.copy(self)
        other._set_passports(key)
        return other

    def grams(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(BᵀB, AAᵀ, G_B, G_A) of a shape group, stacked (computed on first use)."""
        if shape not in self._grams:
            self._set_grams(shape, _grams(self.b[shape], transpose=True), _grams(self.a[shape], transpose=False))
        return self._grams[shape]

    def _set_grams(self, shape, btb: torch.Tensor, aat: torch.Tensor) -> None:
        self._grams[shape] = (btb, aat, _pinv_sym(btb), _pinv_sym(aat))

    def release_sq(self, shape: tuple[int, int]) -> torch.Tensor:
        """‖s·B·C·A‖² per module of a shape group."""
        if shape not in self._release_sq:
            btb, aat = self.grams(shape)[:2]
            c = self.c[shape]
            self._release_sq[shape] = self.scale ** 2 * ((btb @ c @ aat) * c).sum((1, 2))
        return self._release_sq[shape]

    def ready(self) -> "PreparedKey":
        """All key-side algebra done now (else it is done by the first suspects); returns self."""
        for shape in self.groups:
            self.release_sq(shape)
        return self

    def references(self, statistic: str) -> dict[tuple[int, int], torch.Tensor]:
        """Per shape group, the passports a recovered Ĉ is compared with: C (``correlation``) or C − C_p."""
        return self.c if statistic == "correlation" else self.contrast

    def reference(self, name: str, statistic: str) -> torch.Tensor:
        """The passport a recovered Ĉ is compared with: C (``correlation``) or C − C_p (``contrast``)."""
        shape, i = self.where[name]
        return self.references(statistic)[shape][i]


def _stack64(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Stack as float64 with one copy (``torch.stack(...).double()`` makes two), into ``out`` if given."""
    if out is None:
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float64)
    for i, t in enumerate(tensors):
        out[i].copy_(t)
    return out


def _chunks(n: int, bytes_each: int):
    """Slices of ``range(n)`` with at most :data:`CHUNK_BYTES` of float64 workspace each (at least one item)."""
    k = max(1, CHUNK_BYTES // max(bytes_each, 1))
    return [slice(i, min(i + k, n)) for i in range(0, n, k)]


def _grams(mats: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """MᵀM (``transpose``) or MMᵀ for each matrix, float64, computed chunk by chunk in one reused buffer."""
    rows, cols = mats[0].shape
    r = cols if transpose else rows
    out = np.empty((len(mats), r, r))
    buf = None
    for sl in _chunks(len(mats), rows * cols * 8):
        k = sl.stop - sl.start
        if buf is None:
            buf = np.empty((k, rows, cols))
        x = _stack64(mats[sl], torch.from_numpy(buf[:k])).numpy()
        xt = x.transpose(0, 2, 1)
        np.matmul(xt, x, out=out[sl]) if transpose else np.matmul(x, xt, out=out[sl])
    return torch.from_numpy(out)


def _pinv_sym(g: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverses of a stack of symmetric positive semi-definite r×r matrices.

    Where Cholesky succeeds and ‖G‖_F·‖G⁻¹‖_F ≤ 1e8 (an upper bound on the condition number, so no eigenvalue is
    anywhere near pinv's 1e-15 cut-off) the pseudo-inverse is the inverse, taken from the Cholesky factor (≈15× faster
    than an eigendecomposition). The rest — a rank-deficient B, e.g. a zero one — gets the eigendecomposition pinv.
    """
    chol, info = torch.linalg.cholesky_ex(g)
    failed = info != 0
    if failed.any():  # cholesky_inverse raises on a zero pivot; these get the eigendecomposition below
        chol[failed] = torch.eye(g.shape[-1], dtype=g.dtype)
    inv = torch.cholesky_inverse(chol)
    cond = torch.linalg.matrix_norm(g) * torch.linalg.matrix_norm(inv)
    bad = (failed | ~torch.isfinite(cond) | (cond > _COND_MAX)).nonzero().flatten()
    if bad.numel():
        inv[bad] = torch.from_numpy(np.linalg.pinv(g[bad].numpy(), hermitian=True))
    return inv


def prepare(key: SealKey | PreparedKey) -> PreparedKey:
    """``key`` ready for :func:`~seal_diffusion.detection.verify.verify` (a :class:`PreparedKey` is returned as is)."""
    return key if isinstance(key, PreparedKey) else PreparedKey(key)


def _factor_products(prep: PreparedKey, shape, idx: list[int], downs, ups):
    """P = (BᵀU)(DAᵀ) and ‖U·D‖² = tr(UᵀU·DDᵀ) for the modules ``idx`` of one group (suspect rank r' each), and
    BᵀB, AAᵀ of those modules: X = [B U] and Y = [A; D] are filled chunk by chunk in float64, and XᵀX, YYᵀ (one
    symmetric product each, which numpy hands to BLAS syrk) hold every block needed."""
    out_f, in_f = shape
    bs, as_ = prep.b[shape], prep.a[shape]
    r, r2 = bs[0].shape[1], ups[0].shape[1]
    w = r + r2
    xtx, yyt = np.empty((len(idx), w, w)), np.empty((len(idx), w, w))
    bu = du = None
    for sl in _chunks(len(idx), (out_f + in_f) * w * 8):
        k = sl.stop - sl.start
        if bu is None:
            bu, du = np.empty((k, out_f, w)), np.empty((k, w, in_f))
        x, y = bu[:k], du[:k]
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for j, i in enumerate(idx[sl]):
            xt[j, :, :r].copy_(bs[i])
            xt[j, :, r:].copy_(ups[sl.start + j])
            yt[j, :r].copy_(as_[i])
            yt[j, r:].copy_(downs[sl.start + j])
        np.matmul(x.transpose(0, 2, 1), x, out=xtx[sl])  # [[BᵀB, BᵀU], [UᵀB, UᵀU]]
        np.matmul(y, y.transpose(0, 2, 1), out=yyt[sl])  # [[AAᵀ, ADᵀ], [DAᵀ, DDᵀ]]
    p = np.matmul(xtx[:, :r, r:], yyt[:, r:, :r])
    sq = (xtx[:, r:, r:] * yyt[:, r:, r:]).sum((1, 2))
    return p, sq, xtx[:, :r, :r], yyt[:, :r, :r]


def _delta_products(prep: PreparedKey, shape, idx: list[int], deltas) -> tuple[np.ndarray, np.ndarray]:
    """P = Bᵀ·ΔW·Aᵀ and ‖ΔW‖² for full deltas (a merged model), chunk by chunk."""
    out_f, in_f = shape
    bs, as_ = prep.b[shape], prep.a[shape]
    r = bs[0].shape[1]
    p = np.empty((len(idx), r, r))
    sq = np.empty(len(idx))
    for sl in _chunks(len(idx), out_f * in_f * 8):
        d = _stack64(deltas[sl])
        b = _stack64([bs[i] for i in idx[sl]])
        a = _stack64([as_[i] for i in idx[sl]])
        p[sl] = ((b.mT @ d) @ a.mT).numpy()
        sq[sl] = (d * d).sum((1, 2)).numpy()
    return p, sq


def recover_groups(prep: PreparedKey, suspect) -> tuple[list[tuple[tuple[int, int], list[int], torch.Tensor]],
                                                          float | None]:
    """Ĉ for every module of the key that ``suspect`` (a :class:`~seal_diffusion.detection.verify.Suspect`) holds, batched:
    ``[(shape, indices into prep.groups[shape], Ĉ stack)]``, and ‖ΔŴ − s·B·C·A‖ / ‖s·B·C·A‖ over those modules.

    LoRA suspect (down D, up U): P = (BᵀU)(DAᵀ) = Bᵀ·ΔŴ·Aᵀ is r×r, Ĉ = G_B·P·G_A / s; the error needs
    ‖ΔŴ‖² = tr(UᵀU·DDᵀ) and ⟨ΔŴ, s·B·C·A⟩ = s·⟨P, C⟩ — ΔW is never formed. Merged model: P = Bᵀ·ΔW·Aᵀ directly.
    Modules are batched per key shape group and, within it, per suspect rank.
    """
    parts = []
    num = den = 0.0
    s = prep.scale
    for shape, names in prep.groups.items():
        out_f, in_f = shape
        batches: dict[object, list[int]] = {}
        for i, n in enumerate(names):
            if n in suspect.factors:
                down, up = suspect.factors[n]
                if down.dim() != 2 or up.dim() != 2 or down.shape[1] != in_f or up.shape[0] != out_f \
                        or up.shape[1] != down.shape[0]:
                    raise UserError(f"{suspect.path}: {n} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                                    f"but the key's layer is {in_f}→{out_f} (another base model?)")
                batches.setdefault(down.shape[0], []).append(i)
            elif n in suspect.deltas:
                if tuple(suspect.deltas[n].shape) != (out_f, in_f):
                    raise UserError(f"{suspect.path}: {n} has shape {tuple(suspect.deltas[n].shape)}, "
                                    f"the key's layer is {(out_f, in_f)}")
                batches.setdefault("delta", []).append(i)
        fuse = shape not in prep._grams and list(batches.values()) == [list(range(len(names)))] \
            and "delta" not in batches  # the suspect holds the whole group as factors of one rank
        for kind, idx in batches.items():
            if kind == "delta":
                p, suspect_sq = _delta_products(prep, shape, idx, [suspect.deltas[names[i]] for i in idx])
            else:
                p, suspect_sq, btb, aat = _factor_products(prep, shape, idx,
                                                           [suspect.factors[names[i]][0] for i in idx],
                                                           [suspect.factors[names[i]][1] for i in idx])
                if fuse:
                    prep._set_grams(shape, torch.from_numpy(np.ascontiguousarray(btb)),
                                    torch.from_numpy(np.ascontiguousarray(aat)))
            p, suspect_sq = torch.from_numpy(p), torch.from_numpy(suspect_sq)
            g_b, g_a = prep.grams(shape)[2:]
            pick = (lambda t: t) if len(idx) == len(names) else (lambda t: t[idx])  # indexing would copy
            c_hat = pick(g_b) @ p @ pick(g_a) / s
            release_sq = pick(prep.release_sq(shape))
            err_sq = suspect_sq - 2 * s * (p * pick(prep.c[shape])).sum((1, 2)) + release_sq
            num += float(err_sq.clamp_min(0).sum())
            den += float(release_sq.sum())
            parts.append((shape, idx, c_hat))
    return parts, (math.sqrt(num / den) if den > 0 else None)


def _recover(prep: PreparedKey, suspect) -> tuple[dict[str, torch.Tensor], float | None]:
    """Ĉ per module held by the suspect (key order), and the reconstruction error (:func:`recover_groups`)."""
    parts, err = recover_groups(prep, suspect)
    found = {prep.groups[shape][i]: c for shape, idx, c_hat in parts for i, c in zip(idx, c_hat)}
    return {n: found[n] for n in prep.where if n in found}, err


def recover_passports(key: SealKey | PreparedKey, suspect) -> dict[str, torch.Tensor]:
    """Ĉ = pinv(B)·ΔŴ·pinv(A) / s for every module of the key that the suspect holds (float64)."""
    return _recover(prepare(key), suspect)[0]


def passport_std(key: SealKey) -> float:
    """σ of the passports, estimated from all entries of C and C_p (thousands of draws; mean known to be 0)."""
    sq = sum(float((mk.passport.double() ** 2).sum() + (mk.passport_p.double() ** 2).sum()) for mk in key.modules.values())
    n = sum(2 * mk.passport.numel() for mk in key.modules.values())
    return math.sqrt(sq / n)


def sign_flip_neg_log10_p(d: list[float], resolution: int = 1000) -> float:
    """−log10 of the exact one-sided sign-flip p-value P(Σ ε_m |d_m| ≥ Σ d_m), ε_m fair independent signs.

    The |d_m| are put on a grid of step δ = max|d|/resolution; rounding moves the sum by at most e = Mδ/2, so
    P(S ≥ t) ≤ P(S_grid ≥ t − e), which is computed exactly by convolution (conservative). Beyond 1000 modules (2^−M
    would underflow) Hoeffding's bound exp(−t²/2Σd²) is used instead.
    """
    a = np.abs(np.asarray(d, dtype=np.float64))
    t = float(np.sum(d))
    m = a.size
    if m == 0 or t <= 0 or a.max() == 0:
        return 0.0
    if m > 1000:
        return t * t / (2.0 * float(np.sum(a * a))) / LN10
    delta = a.max() / resolution
    q = np.rint(a / delta).astype(np.int64)
    q = q[q > 0]
    # S_grid/δ = 2X − Q with X = the sum of the q_i whose sign is +: a subset sum, each term in with probability ½.
    total = int(q.sum())
    threshold = math.ceil((t - m * delta / 2.0) / delta - 1e-9)  # S_grid/δ ≥ threshold ⇔ X ≥ (threshold + Q)/2
    k0 = max(math.ceil((threshold + total) / 2.0), 0)
    if k0 > total:
        return float(-math.log10(1e-320))
    # P(X ≥ k0) = P(X ≤ Q − k0) (a subset and its complement): only sums up to L = Q − k0 are counted. counts[k] =
    # number of sign patterns with X = k (≤ 2^M, exact enough in float64), grown one term at a time; a real copy has
    # L ≈ M/4 (every sign right), an unrelated file L ≈ Q/2.
    top = total - k0
    counts = np.zeros(top + 1)
    counts[0] = 1.0
    hi = 0
    for qi in q:
        end = min(hi + qi, top)
        if qi <= end:
            counts[qi:end + 1] += counts[:end - qi + 1].copy()
        hi += qi
    tail = float(counts.sum()) / 2.0 ** q.size
    return float(-math.log10(max(min(tail, 1.0), 1e-320)))


def two_sided_neg_log10_p(d: list[float], resolution: int = 1000) -> float:
    """−log10 of the two-sided sign-flip p-value: 2·min(P(S ≥ Σd), P(S ≤ Σd)), S = Σ ε_m |d_m| (ε fair signs).

    The distribution of S is symmetric, so the lower tail is the upper tail of −d; p ≤ 2·min of the two one-sided
    p-values holds whatever the direction, which is what makes a suspect meant for a negative strength (every d_m
    < 0) detectable. The price: the floor is 2^−(M−1) instead of 2^−M (−log10 p lower by log10 2 = 0.30).
    """
    best = max(sign_flip_neg_log10_p(list(d), resolution), sign_flip_neg_log10_p([-x for x in d], resolution))
    return max(0.0, best - math.log10(2.0))


def fit_strengths(prep: PreparedKey, recovered: list[dict[str, torch.Tensor]]) -> list[float]:
    """Strengths s for files loaded together (Σ s_i·ΔW_i), chosen **without the coins**: the s that puts the largest
    share of the recovered Ĉ(s) = Σ s_i·Ĉ_i into span{C_m, C_p,m}, module by module (each module weighted equally).

    ``recovered[i]``: Ĉ per module of file i (:func:`_recover`). The criterion is a generalised Rayleigh quotient
    sᵀQ_in s / sᵀQ_all s with Q_in[i, j] = Σ_m ⟨P_m Ĉ_im, P_m Ĉ_jm⟩ / n_m, Q_all[i, j] = Σ_m ⟨Ĉ_im, Ĉ_jm⟩ / n_m
    (P_m the projection onto the span, n_m = Σ_i ‖Ĉ_im‖²). Swapping C_m and C_p,m leaves the span, hence s,
    unchanged: for a suspect that does not derive from the release, s depends on nothing coin-related and the signs
    of the contrast statistic stay fair coins (the test stays exact). Its sign is arbitrary (the two-sided test
    covers both); returned scaled so that the largest |s_i| is +1. A split release (A at 1, B at 0.5) is found at
    s ∝ (1, 0.5): there Ĉ(s) = C lies in the span.
    """
    import scipy.linalg

    k = len(recovered)
    if k == 1:
        return [1.0]
    q_in, q_all = np.zeros((k, k)), np.zeros((k, k))
    modules = [n for n in prep.where if any(n in r for r in recovered)]
    for name in modules:
        shape, i = prep.where[name]
        c = prep.c[shape][i].reshape(-1)
        c_p = (prep.c[shape][i] - prep.contrast[shape][i]).reshape(-1)
        basis = torch.linalg.qr(torch.stack([c, c_p], 1))[0]  # r² × 2, orthonormal
        y = torch.stack([r[name].double().reshape(-1) if name in r else torch.zeros_like(c) for r in recovered])
        n = float((y * y).sum())
        if not n > 0 or not math.isfinite(n):
            continue
        proj = y @ basis
        q_in += (proj @ proj.T).numpy() / n
        q_all += (y @ y.T).numpy() / n
    if not np.trace(q_all) > 0:
        return [1.0] * k
    ridge = 1e-12 * np.trace(q_all) * np.eye(k)
    _, vecs = scipy.linalg.eigh(q_in, q_all + ridge)
    s = vecs[:, -1]
    s = s / s[np.argmax(np.abs(s))]
    return [float(x) for x in s]
