"""Scan many files against one or many keys: a marketplace-style sweep with a table of verdicts.

Each key's algebra (pseudo-inverses, norms) is computed once; each file is read once and tested against every key.
A file that cannot be read, or holds none of a key's layers under any naming this tool maps, is **not** "not
detected": its row says "could not be checked" and why, and the scan's exit code is 2. A file for another model family
than a key (an SDXL LoRA against an SD 1.5 key: layers of the key's names with other shapes; metadata is not trusted) is
"not applicable" to that key: no test, not counted in the correction, and the exit code is decided by the pairs that
apply. ``--combine`` loads together, per key, the files of that key's family; their strengths are fitted without the
coins (:func:`seal_diffusion.detection.verify.verify`).

**Multiple testing.** One test at −log10 p ≥ 3.3 accuses an innocent file with probability ≤ 5·10⁻⁴; a sweep of
thousands of files × keys would accuse somebody. The verdict of each row is therefore corrected with Holm's step-down
method over all N = files × keys tests (combined rows included): sort the raw p ascending, the i-th smallest gets
p_adj = max_{j≤i} min(1, (N − j + 1)·p_(j)), and a row is DETECTED when p_adj < 10^−threshold. Holm controls the
family-wise error (the chance of accusing *any* innocent file in the whole scan) under any dependence between the
tests — files tested against the same key are dependent — which is the guarantee an accusation needs; Benjamini–
Hochberg would only bound the expected share of false accusations among the hits. The raw −log10 p is reported too.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..core.keyfile import SealKey, check_commitments
from ..formats.lora_file import read_lora
from .verify import DEFAULT_THRESHOLD, combine_suspects, lora_suspect, prepare, verify

CORRECTION = "holm"
CORRECTION_TEXT = "Holm step-down over files × keys (family-wise error)"


@dataclass
class ScanRow:
    key: str
    file: str
    detected: bool | None  # the corrected verdict; None: could not be checked
    neg_log10_p: float | None  # raw
    error: str = ""
    neg_log10_p_adjusted: float | None = None  # Holm
    detected_uncorrected: bool | None = None
    n_modules: int | None = None
    n_modules_missing: int | None = None
    max_neg_log10_p: float | None = None
    applicable: bool = True  # False: the file is for another model family than the key (not a test at all)


def expand_paths(paths) -> list[Path]:
    """Files as given; folders walked for ``*.safetensors`` (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.safetensors") if q.is_file()))
        else:
            out.append(p)
    return out


def holm(neg_log10_ps: list[float | None], n_tests: int | None = None) -> list[float | None]:
    """Holm-adjusted −log10 p of each raw −log10 p (None stays None); ``n_tests`` defaults to the list's length."""
    m = len(neg_log10_ps) if n_tests is None else n_tests
    order = sorted((i for i, v in enumerate(neg_log10_ps) if v is not None), key=lambda i: -neg_log10_ps[i])
    out: list[float | None] = [None] * len(neg_log10_ps)
    running = math.inf
    for rank, i in enumerate(order):
        running = min(running, neg_log10_ps[i] - math.log10(m - rank))
        out[i] = max(running, 0.0)
    return out


def scan(keys, paths, threshold: float = DEFAULT_THRESHOLD, statistic: str = "contrast",
         progress=None, *, combine: bool = False, commitments: list[str] | None = None) -> tuple[list[ScanRow], float]:
    """Verify every file against every key; returns the rows (Holm-corrected verdicts) and files/s.

    ``combine``: also test all files loaded together (their ΔW added), one more row per key. ``commitments``: every
    key must match one of these published commitments (else an error before anything is scanned).
    """
    loaded = []
    for k in keys:
        key = k if isinstance(k, SealKey) else SealKey.load(k)
        loaded.append((str(k), key, prepare(key)))
    check_commitments({name: key for name, key, _ in loaded}, commitments)
    files = expand_paths(paths)
    if not files:
        raise UserError("scan: no files to scan (folders are searched for *.safetensors)")
    rows: list[ScanRow] = []
    suspects: dict[str, list] = {name: [] for name, _, _ in loaded}
    unreadable = 0
    start = time.perf_counter()
    iterator = progress(files) if progress else files
    for f in iterator:
        try:
            lora = read_lora(f)
        except UserError as exc:
            unreadable += 1
            rows.extend(ScanRow(name, str(f), None, None, f"could not be checked: {exc}") for name, _, _ in loaded)
            continue
        for name, key, prepared in loaded:
            suspect = lora_suspect(lora, key, str(f))
            other_family = not_applicable(prepared, suspect)
            if other_family:
                rows.append(ScanRow(name, str(f), None, None, f"not applicable: {other_family}", applicable=False))
                continue
            suspects[name].append(suspect)
            rows.append(_row(name, str(f), prepared, suspect, threshold, statistic))
    if combine and len(files) > 1:
        for name, key, prepared in loaded:
            label = " + ".join(s.path for s in suspects[name])
            if unreadable:
                rows.append(ScanRow(name, label or "(none)", None, None,
                                    "could not be checked: some files could not be read"))
            elif len(suspects[name]) > 1:  # the files of this key's model family, loaded together
                rows.append(_row(name, label, prepared, combine_suspects(suspects[name]), threshold, statistic))
    elapsed = time.perf_counter() - start
    adjusted = holm([r.neg_log10_p for r in rows], sum(r.applicable for r in rows) or 1)
    for r, adj in zip(rows, adjusted):
        r.neg_log10_p_adjusted = adj
        if r.detected is not None:
            r.detected = adj >= threshold
    return rows, len(files) / elapsed if elapsed > 0 else float("inf")


def not_applicable(prepared, suspect) -> str:
    """Why a file is for another model family than the key ('' when it is not): a layer the key has under the same
    name has another shape, so no frontend could load the file onto the key's base model. Metadata
    (``ss_base_model_version``) is not used: anyone can edit it, and a copy must not escape the test by claiming to
    be an SDXL file."""
    for m in sorted(suspect.modules):
        if m not in prepared.where:
            continue
        out_f, in_f = prepared.where[m][0]
        shape = tuple(suspect.deltas[m].shape) if m in suspect.deltas else \
            (suspect.factors[m][1].shape[0], suspect.factors[m][0].shape[1])
        if shape != (out_f, in_f):
            return (f"a LoRA for another model family ({m} is {shape[1]}→{shape[0]}, the key's layer "
                    f"{in_f}→{out_f})")
    return ""


def _row(name, label, prepared, suspect, threshold, statistic) -> ScanRow:
    if not suspect.modules:
        why = f"could not be checked: holds none of this key's {len(prepared.where)} layers under any naming this " \
              "tool maps (another base model, or a layout it cannot read)"
        if suspect.not_tested:
            why += "; present: " + "; ".join(suspect.not_tested)
        return ScanRow(name, label, None, None, why)
    try:
        report = verify(prepared, suspect, threshold, statistic)
    except UserError as exc:
        return ScanRow(name, label, None, None, f"could not be checked: {exc}")
    return ScanRow(name, label, report.detected, report.neg_log10_p, "", None, report.detected,
                   report.n_modules, report.n_modules_missing, report.max_neg_log10_p)


def exit_code(rows: list[ScanRow]) -> int:
    """Decided by the key × file pairs that apply (a file of another model family than a key is not a test): 0: every
    one checked and at least one detected; 1: none detected; 2: any could not be checked, or none applies."""
    rows = [r for r in rows if r.applicable]
    if not rows or any(r.detected is None for r in rows):
        return 2
    return 0 if any(r.detected for r in rows) else 1


def format_table(rows: list[ScanRow], threshold: float = DEFAULT_THRESHOLD) -> str:
    lines = ["| key | file | verdict | −log10 p (raw) | −log10 p (Holm) | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = r.error if r.detected is None else ("DETECTED" if r.detected else "not detected")
        raw = "" if r.neg_log10_p is None else f"{r.neg_log10_p:.1f}"
        adj = "" if r.neg_log10_p_adjusted is None else f"{r.neg_log10_p_adjusted:.1f}"
        note = ""
        if r.n_modules_missing and r.max_neg_log10_p is not None:
            note = f"{r.n_modules_missing} layers missing: at most {r.max_neg_log10_p:.1f} reachable"
        if r.detected_uncorrected and not r.detected:
            note = (note + "; " if note else "") + "raw p passes, corrected does not"
        lines.append(f"| {os.path.basename(r.key)} | {r.file} | {verdict} | {raw} | {adj} | {note} |")
    n = len(rows)
    lines.append(f"\nverdicts corrected for {n} tests ({CORRECTION_TEXT}); a row is detected when its corrected "
                 f"−log10 p ≥ {threshold}")
    return "\n".join(lines)
