#!/usr/bin/env bash
# Run every benchmark and keep the JSON results in benchmarks/results/ (git-ignored).
#   benchmarks/run_all.sh           # quick: tiny default model + verify (~5 min on 2 cores)
#   benchmarks/run_all.sh --full    # also the real SD 1.5 architecture (random weights; ~20–30 min on 2 cores, ~12 GB RAM)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="benchmarks/results"
mkdir -p "$OUT"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE=1

full=0
[[ "${1:-}" == "--full" ]] && full=1

if (( full )); then
  "$PY" benchmarks/bench_training.py --sd15 --json "$OUT/bench_training.json"
  "$PY" benchmarks/bench_vs_peft.py --sd15 --json "$OUT/bench_vs_peft.json"
  "$PY" benchmarks/bench_verify.py --json "$OUT/bench_verify.json"
  "$PY" benchmarks/bench_generation.py --sd15 --json "$OUT/bench_generation.json"
else
  "$PY" benchmarks/bench_training.py --quick --json "$OUT/bench_training.json"
  "$PY" benchmarks/bench_vs_peft.py --quick --json "$OUT/bench_vs_peft.json"
  "$PY" benchmarks/bench_verify.py --json "$OUT/bench_verify.json"
  "$PY" benchmarks/bench_generation.py --json "$OUT/bench_generation.json"
fi
echo "results in $OUT/"
