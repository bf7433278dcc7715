#!/usr/bin/env bash
# Creates .venv and installs dicomfl into it. Safe to re-run.
# The CPU build of PyTorch is installed FIRST and pinned: a bare `torch` requirement with no torch
# installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${DICOMFL_TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==${TORCH_VERSION}"
fi
python -m pip install --quiet -e ".[test]"
echo "dicomfl installed in $(pwd)/.venv"
