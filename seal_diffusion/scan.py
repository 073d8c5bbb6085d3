"""Scan many files against one or many keys: a marketplace-style sweep with a table of verdicts.

Each key's algebra (pseudo-inverses, norms) is computed once; each file is read once and tested against every key.
Unreadable files get an error row and the scan goes on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .keyfile import SealKey
from .lora_file import read_lora
from .verify import DEFAULT_THRESHOLD, Suspect, prepare, verify


@dataclass
class ScanRow:
    key: str
    file: str
    detected: bool | None
    neg_log10_p: float | None
    error: str = ""


def expand_paths(paths) -> list[Path]:
    """Files as given; folders walked for ``*.safetensors`` (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.safetensors") if q.is_file()))
        else:
            out.append(p)
    return out


def scan(keys, paths, threshold: float = DEFAULT_THRESHOLD, statistic: str = "contrast",
         progress=None) -> tuple[list[ScanRow], float]:
    """Verify every file against every key; returns the rows and files/s."""
    loaded = []
    for k in keys:
        key = k if isinstance(k, SealKey) else SealKey.load(k)
        loaded.append((str(k), key, prepare(key)))
    files = expand_paths(paths)
    if not files:
        raise UserError("scan: no files to scan (folders are searched for *.safetensors)")
    rows: list[ScanRow] = []
    start = time.perf_counter()
    iterator = progress(files) if progress else files
    for f in iterator:
        try:
            lora = read_lora(f)
        except UserError as exc:
            rows.extend(ScanRow(name, str(f), None, None, str(exc)) for name, _, _ in loaded)
            continue
        for name, key, prepared in loaded:
            suspect = Suspect(str(f), lora.layout, factors=lora.by_module(key.modules))
            if not suspect.factors:
                rows.append(ScanRow(name, str(f), False, 0.0, "no module of this key"))
                continue
            report = verify(prepared, suspect, threshold, statistic)
            rows.append(ScanRow(name, str(f), report.detected, report.neg_log10_p))
    elapsed = time.perf_counter() - start
    return rows, len(files) / elapsed if elapsed > 0 else float("inf")


def format_table(rows: list[ScanRow]) -> str:
    lines = ["| key | file | verdict | −log10 p |", "|---|---|---|---|"]
    for r in rows:
        verdict = "error: " + r.error if r.detected is None else ("DETECTED" if r.detected else "not detected")
        nlp = "" if r.neg_log10_p is None else f"{r.neg_log10_p:.1f}"
        lines.append(f"| {os.path.basename(r.key)} | {r.file} | {verdict} | {nlp} |")
    return "\n".join(lines)
