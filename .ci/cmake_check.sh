#!/usr/bin/env bash
# Configures and builds CMakeLists.txt (CPU only) in a temporary folder, then loads the library
# with torch.ops.load_library, runs torch.ops.gfmrag_fast.rel_aggregate on a tiny graph and checks
# that a crafted graph array is rejected with a ValueError.
#
#   PYTHON=.venv/bin/python MAX_JOBS=2 .ci/cmake_check.sh
#
# Set KEEP_BUILD=1 to keep the build folder (its path is printed).
set -euo pipefail

PY="${PYTHON:-python}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/gfmrag_fast_cmake.XXXXXX")"
if [[ "${KEEP_BUILD:-0}" == "1" ]]; then
  echo "cmake_check: build folder kept at ${BUILD}"
else
  trap 'rm -rf "${BUILD}"' EXIT
fi

PY_EXE="$("${PY}" -c 'import sys; print(sys.executable)')"
TORCH_PREFIX="$("${PY_EXE}" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

cmake -G Ninja -S "${ROOT}" -B "${BUILD}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGFMRAG_FAST_WITH_CUDA=OFF \
  -DCMAKE_PREFIX_PATH="${TORCH_PREFIX}" \
  -DPython3_EXECUTABLE="${PY_EXE}"
cmake --build "${BUILD}" -j"${MAX_JOBS:-2}"

LIB="${BUILD}/libgfmrag_fast_ops.so"
[[ -f "${LIB}" ]] || { echo "cmake_check: ${LIB} was not built" >&2; exit 1; }

# Deliberately no `import gfmrag_fast`: it would load gfmrag_fast._C, which registers the same ops.
"${PY_EXE}" - "${LIB}" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
assert hasattr(torch.ops.gfmrag_fast, "rel_aggregate"), "torch.ops.gfmrag_fast.rel_aggregate missing"

# 2 nodes, 1 relation, 1 edge 1 -> 0 (edge_index = [[dst], [src]] = [[0], [1]], type 0).
# Arrays in the GraphField order of csrc/rel_aggregate.h, all int32.
i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
graph = [
    i32(0, 1, 1),  # dst_ptr   [N + 1]: node 0 has the edge
    i32(1),        # dst_src
    i32(0),        # dst_type
    i32(0),        # dst_eid
    i32(0, 0, 1),  # src_ptr   [N + 1]: node 1 sends the edge
    i32(0),        # src_dst
    i32(0),        # src_type
    i32(0),        # src_eid
    i32(0, 1),     # rel_ptr   [R + 1]
    i32(0),        # rel_eid
    i32(1),        # rel_src
    i32(0),        # rel_dst
    i32(1),        # edge_src
    i32(0),        # edge_dst
    i32(0),        # edge_type
    # The work plan: no row is longer than a chunk, so no list has pieces.
    i32(0, 0, 0), i32(), i32(),  # dst_piece_ptr [N + 1], dst_piece_begin, dst_piece_end
    i32(0, 0, 0), i32(), i32(),  # src_piece_*
    i32(0, 0), i32(), i32(),     # rel_piece_ptr [R + 1], rel_piece_*
]
x = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # [B=1, N=2, d=3]
relation = torch.tensor([[0.5, -1.0, 2.0]])             # [R=1, d=3]
weight = torch.tensor([2.0])

out, _ = torch.ops.gfmrag_fast.rel_aggregate(x, relation, graph, None, None, "distmult", "sum")
expected = torch.stack([x[0, 1] * relation[0], torch.zeros(3)]).unsqueeze(0)
torch.testing.assert_close(out, expected)

out, _ = torch.ops.gfmrag_fast.rel_aggregate(x, relation, graph, weight, None, "transe", "max")
expected = torch.stack([2.0 * (x[0, 1] + relation[0]), torch.zeros(3)]).unsqueeze(0)
torch.testing.assert_close(out, expected)
print("cmake_check: rel_aggregate ran on CPU:", out.tolist())

# The library checks crafted arrays itself, without the Python wrappers: an error, not a crash.
crafted = list(graph)
crafted[1] = i32(10**9)  # dst_src: a source node far outside [0, N)
try:
    torch.ops.gfmrag_fast.rel_aggregate(x, relation, crafted, None, None, "distmult", "sum")
except ValueError as exc:
    assert "graph array dst_src" in str(exc), exc
else:
    raise AssertionError("cmake_check: a crafted graph array was not rejected")
print("cmake_check: crafted graph array rejected")
EOF

echo "cmake build: OK"
