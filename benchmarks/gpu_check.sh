#!/usr/bin/env bash
# The GPU check: build for sm_90, the CUDA tests, a compute-sanitizer memcheck, the kernel,
# sampling and training-step benchmarks, a scale sweep; a summary.json and a table of the targets.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]      # default: $OUT, else ./gpu_check_out
#
# One deadline for everything, the build included: GPU_CHECK_DEADLINE_S seconds (default 420,
# 7 minutes on one H100). Each step runs under `timeout` with the time left and is skipped, with a
# note, when less than it needs is left; steps run cheapest and most valuable first. After every
# step benchmarks/summarize.py rewrites OUTPUT_DIR/summary.json, so a step cut off by the deadline
# (or the machine taken away) loses nothing measured before it. The last thing printed is the
# table of targets: each target, our number, pass or miss, the card.
#
# GPU_CHECK_DRY_RUN=1 runs the same steps on a CPU machine, to test the script: no build (it loads
# the library built in place), CPU tests and benchmarks at small sizes, no sanitizer, a 240 s
# deadline by default.
#
# Python packages the GPU machine lacks (hydra-core, omegaconf, antlr4-python3-runtime) are
# installed from ./.whl/*.whl when present: scripts/prepare_gpu_wheels.sh fills that folder.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "${OUT_DIR}"
PY="${PYTHON:-python3}"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
if [[ "${DRY_RUN}" == "1" ]]; then DEFAULT_DEADLINE=240; else DEFAULT_DEADLINE=420; fi
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_DEADLINE_S:-${DEFAULT_DEADLINE}} ))
STEPS="${OUT_DIR}/steps.tsv"
: >"${STEPS}"
rm -f "${OUT_DIR}"/bench_*.json "${OUT_DIR}/train_step.json" "${OUT_DIR}/scale.json" "${OUT_DIR}/tests.xml" \
  "${OUT_DIR}/memcheck.log"
status=0

summarize() {
  "${PY}" benchmarks/summarize.py "${OUT_DIR}" "$@" 2>>"${OUT_DIR}/summarize.log" || status=1
}

# run_step NAME MIN_SECONDS LOG COMMAND...: COMMAND under `timeout` with the seconds left before
# the deadline, its output in OUTPUT_DIR/LOG; skipped when fewer than MIN_SECONDS are left. The
# outcome goes to steps.tsv (name, ok | failed | timeout | skipped, seconds, note), then the
# summary is rewritten. Returns COMMAND's exit status (0 when skipped); LAST_OUTCOME says which.
LAST_OUTCOME=""
run_step() {
  local name="$1" min="$2" log="$3"
  shift 3
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < min )); then
    echo "== ${name}: skipped (${left} s left, needs ${min} s)"
    printf '%s\tskipped\t0\t%s\n' "${name}" "${left} s left before the deadline, needs ${min} s" >>"${STEPS}"
    LAST_OUTCOME=skipped
    summarize --quiet
    return 0
  fi
  echo "== ${name} ($(date +%T), ${left} s left)"
  local start rc outcome
  start=$(date +%s)
  timeout --kill-after=5 "${left}" "$@" >"${OUT_DIR}/${log}" 2>&1
  rc=$?
  case "${rc}" in
    0) outcome=ok ;;
    124 | 137) outcome=timeout; status=1 ;;
    *) outcome=failed; status=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "${name}" "${outcome}" "$(( $(date +%s) - start ))" "exit ${rc}, log ${log}" >>"${STEPS}"
  LAST_OUTCOME="${outcome}"
  tail -n 4 "${OUT_DIR}/${log}"
  summarize --quiet
  return "${rc}"
}

if [[ "${DRY_RUN}" == "1" ]]; then
  echo "cpu (dry run)" >"${OUT_DIR}/gpu.txt"
  DEVICE=cpu
else
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 >"${OUT_DIR}/gpu.txt"
  [[ -s "${OUT_DIR}/gpu.txt" ]] || echo "unknown GPU" >"${OUT_DIR}/gpu.txt"
  DEVICE=cuda
fi
echo "gpu check on $(cat "${OUT_DIR}/gpu.txt"), deadline in $(( DEADLINE - $(date +%s) )) s, output in ${OUT_DIR}"

# --- 1. what the machine lacks, and the build
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/gfmrag_gpu_check_site"
  run_step "install carried wheels" 5 wheels.log \
    "${PY}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE}" .whl/*.whl \
    && export PYTHONPATH="${SITE}:${PYTHONPATH:-}"
fi
if [[ "${DRY_RUN}" == "1" ]]; then
  run_step "build (dry run: load the library built in place)" 5 build.log "${PY}" -c "import gfmrag_fast.ops"
else
  run_step "build (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=$(nproc))" 60 build.log \
    env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "${PY}" setup.py build_ext --inplace
fi
export PYTHONPATH="${PWD}:${PYTHONPATH:-}"
if [[ "${LAST_OUTCOME}" != ok ]]; then
  echo "the build did not succeed (${LAST_OUTCOME}): nothing else can run" >&2
  tail -n 30 "${OUT_DIR}/build.log" 2>/dev/null
  summarize
  exit 1
fi

# --- 2. correctness: the CUDA tests (parity, fp64 gradcheck, opcheck), a memcheck of a small case
TIMEOUT_ARGS=()
"${PY}" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=120)
if [[ "${DRY_RUN}" == "1" ]]; then
  TEST_FILES=(tests/test_ops_hardening.py)
  TEST_SELECT="not cuda"
else
  # The data and workflow tests need the offline text model, which this machine lacks; the CPU
  # parametrisations run in CI.
  TEST_FILES=(tests/test_rel_aggregate.py tests/test_triple_sampling.py tests/test_ops_hardening.py
              tests/test_dense_tail.py tests/test_models.py tests/test_dense.py tests/test_losses_metrics.py)
  TEST_SELECT="cuda"  # the CUDA parametrisations and tests marked cuda
fi
run_step "tests (${TEST_SELECT})" 30 tests.log "${PY}" -m pytest "${TEST_FILES[@]}" -q -p no:cacheprovider \
  -k "${TEST_SELECT}" "${TIMEOUT_ARGS[@]}" --junitxml="${OUT_DIR}/tests.xml"

if [[ "${DRY_RUN}" == "1" ]]; then
  run_step "memcheck case (dry run: on the CPU, no sanitizer)" 10 memcheck.log \
    "${PY}" benchmarks/memcheck_case.py --device cpu
elif command -v compute-sanitizer >/dev/null; then
  run_step "compute-sanitizer memcheck of a small case" 30 memcheck.log \
    compute-sanitizer --tool memcheck --error-exitcode 1 "${PY}" benchmarks/memcheck_case.py --device cuda
else
  echo "compute-sanitizer not found" | tee "${OUT_DIR}/memcheck.log"
fi

# --- 3. benchmarks, most valuable first. Every pytest run writes its rows (bench_<name>.json)
# after each case, so a cut-off run keeps what it measured.
bench() {  # bench NAME MIN_SECONDS SELECTION FILE...
  local name="$1" min="$2" select="$3"
  shift 3
  run_step "benchmarks: ${name}" "${min}" "bench_${name}.log" \
    env GFMRAG_BENCH_JSON="${OUT_DIR}/bench_${name}.json" "${PY}" -m pytest "$@" -q -p no:cacheprovider \
    -k "${select}" --benchmark-columns=median,min,rounds
}
if [[ "${DRY_RUN}" == "1" ]]; then
  bench kernels 20 "cpu-hotpotqa4-B8-cpu and skewed and shared and fp32 and batch_major and kernel" \
    benchmarks/bench_rel_aggregate.py
  bench sampling 15 "cpu and kernel" benchmarks/bench_triple_sampling.py
  run_step "training step (dry run: CPU, N = 20k)" 20 train_step.log \
    "${PY}" benchmarks/bench_train_step.py --device cpu --case cpu-N20k --impl kernel --rounds 1 \
    --json "${OUT_DIR}/train_step.json"
  bench kernels_more 20 "cpu-hotpotqa4-B8-cpu and uniform and shared and fp32 and batch_major and forward-kernel" \
    benchmarks/bench_rel_aggregate.py
  run_step "scale (dry run: small graphs)" 20 scale.log \
    "${PY}" benchmarks/bench_scale.py --device cpu --procs 1 --sizes 2000 4000 --batch 2 --dim 16 --layers 2 \
    --text-dim 32 --steps 1 --kg none --budget-gib 0 --json "${OUT_DIR}/scale.json"
else
  # rel_aggregate on the real-shape HotpotQA-sized graph, B = 8 and B = 1, fp32 and bf16, with the
  # reference and PyG baselines of the same run.
  bench kernels 45 "cuda and hotpotqa and skewed" benchmarks/bench_rel_aggregate.py
  bench sampling 20 "cuda" benchmarks/bench_triple_sampling.py
  # GFM-RAG's size: 6 x 512, 768-d text, B = 8, HotpotQA-sized; fp32 and bf16, peak memory.
  run_step "training step (GFM-RAG's size)" 60 train_step.log \
    "${PY}" benchmarks/bench_train_step.py --device cuda --impl kernel --json "${OUT_DIR}/train_step.json"
  # (d512: the dense tail's GFM-RAG-size cases, which the selection used to miss.)
  bench kernels_more 45 "cuda and ((hotpotqa and uniform) or big-B8 or d512)" benchmarks/bench_rel_aggregate.py \
    benchmarks/bench_dense_tail.py
  run_step "scale: peak memory of the fine-tune step against graph size (6 x 512, B = 8)" 60 scale.log \
    "${PY}" benchmarks/bench_scale.py --device cuda --procs 1 --sizes 10000 20000 40000 --batch 8 --dim 512 \
    --budget-gib 20 --json "${OUT_DIR}/scale.json"
  bench kernels_huge 45 "cuda and huge-B8" benchmarks/bench_rel_aggregate.py
fi

echo "== summary ($(( DEADLINE - $(date +%s) )) s left before the deadline)"
summarize
exit "${status}"
