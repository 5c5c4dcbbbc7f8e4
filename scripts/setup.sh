#!/usr/bin/env bash
# Sets up (or reuses) a virtual environment and builds gfmrag_fast in it, editable.
#
#   bash scripts/setup.sh            # venv in .venv (VENV=path to choose another)
#
# The CUDA kernels are built when torch is a CUDA build and a CUDA toolkit is found (nvcc on PATH
# or CUDA_HOME), whether or not a GPU is present; FORCE_CUDA=1 insists, FORCE_ONLY_CPU=1 skips them.
# TORCH_SPEC picks torch (default torch==2.14.1, a CUDA build that also runs on CPU).
#
# A second run does only what changed since the first: the dependencies are installed again only
# when pyproject.toml, TORCH_SPEC or the Python changed, the extension is compiled again only when
# a file under csrc/, setup.py, CMakeLists.txt, a build switch (FORCE_CUDA, FORCE_ONLY_CPU,
# TORCH_CUDA_ARCH_LIST, DEBUG, CUDA_HOME, CXX) or the torch version changed, and then only the
# changed files are (ninja keeps its objects in build/ext/). The stamps live in the venv
# (.gfmrag_fast-deps, .gfmrag_fast-build); REBUILD=1 ignores them. The full compiler output of the
# last build is in build/setup-build.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
VPY="${VENV}/bin/python"
DEPS_STAMP="${VENV}/.gfmrag_fast-deps"
BUILD_STAMP="${VENV}/.gfmrag_fast-build"
LOG=build/setup-build.log
t0=$(date +%s)

say() { echo "setup: $*"; }

# Prints "[k/n] compiling <source>" for each ninja step and the lines a user must see (pip's
# progress, compiler errors); everything else goes to the log only. A bash loop, not awk: mawk
# reads its input in large blocks, which would hold the progress back until the build ends.
progress() {
  local line step src
  while IFS= read -r line; do
    line="${line#"${line%%[![:space:]]*}"}"  # pip indents the build backend's output
    if [[ "${line}" =~ ^(\[[0-9]+/[0-9]+\]) ]]; then
      step="${BASH_REMATCH[1]}"
      src="${line##* }"
      # the source follows -c (torch's ninja rules write "-c -c <source>" for C++)
      if [[ "${line}" =~ \ -c\ (-c\ )?([^ ]+) ]]; then src="${BASH_REMATCH[2]}"; fi
      echo "setup:   ${step} compiling csrc/${src##*/csrc/}"
    elif [[ "${line}" == *" -shared "* && "${line}" == *_C.so* ]]; then
      echo "setup:   linking gfmrag_fast/_C.so"
    elif [[ "${line}" =~ ^(Collecting|Installing\ collected|Successfully\ installed|ERROR|FAILED|gfmrag_fast:\ building) ||
            "${line}" =~ (error|Error): ]]; then
      echo "setup:   ${line}"
    fi
  done
}

# Runs "$@" with its output in the log and the filtered progress on the console; on failure,
# prints the end of the log.
run_logged() {
  mkdir -p build
  : > "${LOG}"
  if ! "$@" 2>&1 | tee -a "${LOG}" | progress; then
    say "FAILED: $*"
    say "last lines of ${LOG}:"
    tail -n 40 "${LOG}"
    exit 1
  fi
}

digest() { "${VPY}" - "$@" <<'PY'
import hashlib, os, sys
h = hashlib.sha256()
for item in sys.argv[1:]:
    h.update(item.encode() + b"\0")
    if os.path.isfile(item):
        with open(item, "rb") as f:
            h.update(f.read())
print(h.hexdigest())
PY
}

if [[ ! -x "${VPY}" ]]; then
  say "creating ${VENV}"
  "${PYTHON}" -m venv "${VENV}"
fi

deps_key=$(digest pyproject.toml "torch=${TORCH_SPEC}" "$("${VPY}" -VV)")
built=0
if [[ "${REBUILD:-0}" != 1 && -f "${DEPS_STAMP}" && "$(cat "${DEPS_STAMP}")" == "${deps_key}" ]]; then
  say "dependencies up to date (pyproject.toml and TORCH_SPEC unchanged)"
else
  say "installing pip, setuptools, ${TORCH_SPEC}, ninja (the first time: a few minutes, torch is large)"
  PIP=("${VPY}" -m pip --disable-pip-version-check)
  run_logged "${PIP[@]}" install --upgrade pip setuptools wheel
  run_logged "${PIP[@]}" install "${TORCH_SPEC}" ninja
  # The package's own dependencies and its [test] extra, then the extension, compiled once here.
  say "installing gfmrag_fast[test] (editable) and compiling the extension"
  say "  (FORCE_CUDA=${FORCE_CUDA:-0}, FORCE_ONLY_CPU=${FORCE_ONLY_CPU:-0}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}, MAX_JOBS=${MAX_JOBS})"
  start=$(date +%s)
  run_logged "${PIP[@]}" install -v --no-build-isolation -e ".[test]"
  say "installed and built in $(( $(date +%s) - start )) s"
  echo "${deps_key}" > "${DEPS_STAMP}"
  built=1
fi

build_key() {
  local sources
  sources=$(find csrc -type f | LC_ALL=C sort)
  # shellcheck disable=SC2086
  digest ${sources} setup.py CMakeLists.txt \
    "FORCE_CUDA=${FORCE_CUDA:-}" "FORCE_ONLY_CPU=${FORCE_ONLY_CPU:-}" "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" \
    "DEBUG=${DEBUG:-}" "CUDA_HOME=${CUDA_HOME:-}" "CXX=${CXX:-}" \
    "torch $("${VPY}" -c 'import importlib.metadata as m; print(m.version("torch"))')"  # not importing it: seconds
}
key=$(build_key)
if [[ "${built}" == 1 ]]; then
  echo "${key}" > "${BUILD_STAMP}"
elif [[ "${REBUILD:-0}" != 1 && -f gfmrag_fast/_C.so && -f "${BUILD_STAMP}" && "$(cat "${BUILD_STAMP}")" == "${key}" ]]; then
  say "extension up to date (csrc/, setup.py, build switches and torch unchanged)"
else
  say "compiling the extension (changed sources only; FORCE_CUDA=${FORCE_CUDA:-0}, FORCE_ONLY_CPU=${FORCE_ONLY_CPU:-0}, MAX_JOBS=${MAX_JOBS})"
  start=$(date +%s)
  run_logged "${VPY}" setup.py build_ext --inplace
  say "compiled in $(( $(date +%s) - start )) s"
  echo "${key}" > "${BUILD_STAMP}"
fi

"${VPY}" - <<'PY'
import torch
import gfmrag_fast.ops  # noqa: F401
from gfmrag_fast.ops._library import has_kernels_for
print(f"setup: gfmrag_fast ready: torch {torch.__version__}, CPU kernels {has_kernels_for(torch.device('cpu'))}, "
      f"CUDA kernels {has_kernels_for(torch.device('cuda'))}")
PY
say "done in $(( $(date +%s) - t0 )) s; activate the venv with: source ${VENV}/bin/activate"
