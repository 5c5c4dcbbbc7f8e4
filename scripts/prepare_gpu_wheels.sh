#!/usr/bin/env bash
# Fills ./.whl with pure-Python wheels of the packages the GPU machine lacks (hydra-core,
# omegaconf, antlr4-python3-runtime), for benchmarks/gpu_check.sh to install there offline.
#
#   bash scripts/prepare_gpu_wheels.sh [DEST]      # default: ./.whl (ignored by git)
#
# Versions are those installed in PYTHON (default .venv/bin/python, else python3), so the GPU run
# uses what the tests here use; where one is not installed: hydra-core 1.3.8, omegaconf 2.3.0
# (hydra-core 1.3 needs < 2.4), antlr4-python3-runtime 4.9.3 (omegaconf 2.3 needs 4.9.*). The
# last is published only as a source archive: `pip wheel` builds its wheel. pip takes the files
# from its cache or the package index, as configured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="${1:-.whl}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "${DEST}"

mapfile -t SPECS < <("${PYTHON}" - <<'PYEOF'
from importlib import metadata

for name, fallback in (("hydra-core", "1.3.8"), ("omegaconf", "2.3.0"), ("antlr4-python3-runtime", "4.9.3")):
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = fallback
    print(f"{name}=={version}")
PYEOF
)
echo "prepare_gpu_wheels: ${SPECS[*]} -> ${DEST}"
"${PYTHON}" -m pip wheel -q --no-deps --wheel-dir "${DEST}" "${SPECS[@]}"

# The GPU machine's Python may differ from this one: only pure-Python wheels will install there.
status=0
for spec in "${SPECS[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  stem="${name//-/_}-${version}-"
  found=$(compgen -G "${DEST}/${stem}*.whl" || true)
  if [[ -z "${found}" ]]; then
    echo "prepare_gpu_wheels: no wheel ${stem}*.whl in ${DEST}" >&2
    status=1
  elif [[ "${found}" != *-none-any.whl ]]; then
    echo "prepare_gpu_wheels: ${found} is not a pure-Python wheel" >&2
    status=1
  fi
done
ls -l "${DEST}"
exit "${status}"
