#!/usr/bin/env bash
# Sets up (or reuses) a virtual environment and builds gfmrag_fast in it, editable.
#
#   bash scripts/setup.sh            # venv in .venv (VENV=path to choose another)
#
# The CUDA kernels are built when torch is a CUDA build and a CUDA toolkit is found (nvcc on PATH
# or CUDA_HOME), whether or not a GPU is present; FORCE_CUDA=1 insists, FORCE_ONLY_CPU=1 skips them.
# TORCH_SPEC picks torch (default torch==2.14.1, a CUDA build that also runs on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"

if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "setup: creating ${VENV}"
  "${PYTHON}" -m venv "${VENV}"
fi
PIP=("${VENV}/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install "${TORCH_SPEC}" numpy ninja "pytest>=8" "pytest-benchmark>=4" expecttest scipy pymetis

export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
echo "setup: building gfmrag_fast (FORCE_CUDA=${FORCE_CUDA:-0}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}, MAX_JOBS=${MAX_JOBS})"
start=$(date +%s)
"${PIP[@]}" install --no-build-isolation -e ".[test]"
echo "setup: built in $(( $(date +%s) - start )) s"
"${VENV}/bin/python" - <<'PY'
import torch
import gfmrag_fast.ops  # noqa: F401
from gfmrag_fast.ops._library import has_kernels_for
print(f"setup: gfmrag_fast ready: torch {torch.__version__}, CPU kernels {has_kernels_for(torch.device('cpu'))}, "
      f"CUDA kernels {has_kernels_for(torch.device('cuda'))}")
PY
