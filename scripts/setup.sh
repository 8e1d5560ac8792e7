#!/usr/bin/env bash
# Create .venv and install PostDiff (all packages, editable) with the pinned versions of constraints.txt.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
echo "setup: installing PostDiff and its pinned dependencies (torch 2.13.0 CPU; see README to use another build)"
.venv/bin/python -m pip install --quiet -c constraints.txt \
  torch \
  -e packages/postdiff-core \
  -e apps/cli \
  pytest ruff nox
.venv/bin/python -c "import postdiff, torch, diffusers; print(f'setup: ok (postdiff {postdiff.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__})')"
