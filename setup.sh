#!/usr/bin/env bash
# Create .venv and install seal-diffusion with the pinned CPU stack (constraints.txt keeps torch at the local
# 2.13.0 CPU build, so no CUDA wheels are pulled). Safe to re-run: it only installs what is missing.
# GPU users: create your own environment with your CUDA torch, then `pip install -e .` (no constraints file).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
