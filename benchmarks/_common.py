"""Shared helpers for the benchmark scripts: machine description, interleaved timing, peak RSS, result tables.

Not a test module and not part of the library. Every script measures the thing under test (SEAL / ours) and its
baseline *in the same run*, interleaved A B B A A B B A …, and reports medians plus the median of the per-pair ratios,
so a slow-down of the shared machine during the run hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

# benchmarks report process CPU time next to wall time: idle threads must sleep, not spin, for that to mean work
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- machine -----------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
    }
    for mod in ("diffusers", "peft", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - informational only
            info[mod] = None
    try:
        mem = Path("/proc/meminfo").read_text()
        info["mem_total_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", mem).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    return info


def print_machine(info: dict) -> None:
    print(f"machine: {info['cpu']} — {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs, "
          f"{info.get('mem_total_gib', '?')} GiB RAM, avx512_bf16={info['avx512_bf16']}")
    print(f"software: torch {info['torch']} ({info['torch_threads']} threads), diffusers {info['diffusers']}, "
          f"peft {info['peft']}, Python {info['python']}, OMP_WAIT_POLICY={info['omp_wait_policy']}, GOMP_SPINCOUNT={info['gomp_spincount']}")
    if info.get("load_avg_start"):
        print("load average at start: " + ", ".join(f"{x:.2f}" for x in info["load_avg_start"])
              + "  (>0 means other jobs share the CPU: trust the ratios, not the absolute times)")


# -- timing ------------------------------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                before: dict[str, Callable[[], None]] | None = None,
                cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Time each of two (or more) callables ``reps`` times, interleaved A B B A A B …; returns wall seconds per call.

    ``before[name]()`` runs untimed before each call of ``name`` (e.g. to swap which adapter is active). ``warmup``
    untimed calls of each come first. If ``cpu_times`` is given, it is filled with the process CPU time of each call
    (all threads; less sensitive than wall time to other jobs taking the cores, given OMP_WAIT_POLICY=PASSIVE).
    """
    names = list(fns)
    before = before or {}
    for _ in range(warmup):
        for n in names:
            before.get(n, lambda: None)()
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            before.get(n, lambda: None)()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(n, []).append(time.process_time() - c0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b) if y > 0]


# -- memory ------------------------------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    m = re.search(rf"{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def rss_kib() -> int:
    return _status_kib("VmRSS")


def peak_rss_kib() -> int:
    return _status_kib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# -- results -----------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    metric: str
    ours: float | None
    baseline: float | None
    unit: str
    goal: str  # e.g. "≤ 1.02×" (applies to ratio) or "≤ 0.2 s" (applies to ours)
    goal_value: float | None
    goal_on: str = "ratio"  # ratio (ratio ≤ goal) | ours (ours ≤ goal) | ours_min (ours ≥ goal) | none
    ratio: float | None = None
    spread: str = ""  # e.g. paired ratio range
    note: str = ""
    samples: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.ratio is None and self.ours is not None and self.baseline:
            self.ratio = self.ours / self.baseline

    @property
    def met(self) -> bool | None:
        if self.goal_on == "none" or self.goal_value is None:
            return None
        value = self.ratio if self.goal_on == "ratio" else self.ours
        if value is None:
            return None
        if self.goal_on == "ours_min":
            return value >= self.goal_value
        return value <= self.goal_value


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "—"
    if unit == "s":
        return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"
    if unit == "MiB":
        return f"{x:.0f} MiB" if x >= 100 else f"{x:.1f} MiB"
    if unit == "files/s":
        return f"{x:.1f} files/s"
    return f"{x:.4g} {unit}".strip()


def print_table(title: str, rows: list[Row]) -> None:
    print()
    print(f"## {title}")
    print()
    print("| metric | SEAL/ours | baseline | ratio | goal | met? | noise / note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        met = {True: "yes", False: "NO", None: "—"}[r.met]
        ratio = "—" if r.ratio is None else f"{r.ratio:.3f}×"
        extra = "; ".join(x for x in (r.spread, r.note) if x)
        print(f"| {r.metric} | {_fmt(r.ours, r.unit)} | {_fmt(r.baseline, r.unit)} | {ratio} | {r.goal} | {met} "
              f"| {extra} |")
    print()


def timing_row(metric: str, ours: list[float], base: list[float], goal: float | None, note: str = "") -> Row:
    """A row from interleaved timings: medians, the median per-pair ratio and its range (``goal=None``: diagnostic)."""
    pr = paired_ratios(ours, base)
    spread = f"pair ratios {min(pr):.3f}–{max(pr):.3f} (n={len(pr)})" if pr else ""
    return Row(metric, median(ours), median(base), "s", f"≤ {goal:.2f}×" if goal else "(diagnostic)", goal,
               "ratio" if goal else "none",
               ratio=median(pr) if pr else None, spread=spread, note=note,
               samples={"ours_s": ours, "baseline_s": base})


def write_json(path: str | os.PathLike | None, script: str, info: dict, rows: list[Row], extra: dict | None = None):
    if not path:
        return
    info = dict(info)
    info["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {
        "script": script,
        "machine": info,
        "rows": [dict(asdict(r), met=r.met) for r in rows],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        out.update(extra)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def run_worker(script: str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --_worker …`` in a fresh Python process and parse the last JSON line it prints."""
    import subprocess

    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"worker {args} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
