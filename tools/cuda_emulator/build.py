"""Builds the CPU emulation of csrc/cuda/rel_aggregate_cuda.cu (see README.md).

    python tools/cuda_emulator/build.py     # needs gfmrag_fast built in place (gfmrag_fast/_C.so)
"""

import os
import re
import sys

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(HERE, "build")
os.makedirs(BUILD, exist_ok=True)

# --- the .cu as plain C++: launches become emu_launch calls, CUDA headers go, registration moves
# to the gfmrag_emu namespace, and every vector access is checked for alignment and counted.
src = open(os.path.join(REPO, 'csrc', 'cuda', 'rel_aggregate_cuda.cu')).read()
src = re.sub(r'#include <c10/cuda/[^>]*>\n', '', src)
n_launch = 0
def repl(m):
    global n_launch; n_launch += 1
    return f'emu_launch({m.group(2)}, {m.group(1)}, '
src, n = re.subn(r'(\w+(?:<[^<>]*>)?)\s*<<<(.*?)>>>\(', repl, src, flags=re.S)
print('launches replaced:', n, file=sys.stderr)
i = src.index('TORCH_LIBRARY_IMPL(gfmrag_fast, CUDA, m)')
j = src.index('}', i)
src = src[:i] + open(os.path.join(HERE, 'register.inc')).read() + src[j:]

# alignment check + counters on every pack access; a grid cap settable at run time
chk = 'if (reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, V>) != 0) throw std::runtime_error("misaligned pack access"); (V > 1 ? g_vec_access : g_scalar_access)++;\n  '
for old in ('return *reinterpret_cast<const Pack<T, V>*>(p);', '*reinterpret_cast<Pack<T, V>*>(p) = value;'):
    assert src.count(old) == 1, old
    src = src.replace(old, chk + old)
old = 'constexpr int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();'
assert src.count(old) == 1
src = src.replace(old, 'int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();\nvoid emu_set_max_grid(int64_t n) { kMaxGridBlocks = n; }')
open(os.path.join(BUILD, 'emu_body.inc'), 'w').write(src)

# --- compile it against the package's own library (the shared input checks live there)
SO_DIR = os.path.join(REPO, "gfmrag_fast")
torch.ops.load_library(os.path.join(SO_DIR, "_C.so"))
load(name="gfmrag_emu", sources=[os.path.join(HERE, "emu.cpp")],
     extra_cflags=["-O1", "-std=c++20", f"-I{BUILD}", f"-I{os.path.join(REPO, 'csrc', 'cuda')}"],
     extra_ldflags=[f"-L{SO_DIR}", "-l:_C.so", f"-Wl,-rpath,{SO_DIR}"], is_python_module=False,
     build_directory=BUILD, verbose=False)
print("built", torch.ops.gfmrag_emu.rel_aggregate)

# --- csrc/cuda/triple_index_cuda.cu: a library of its own (build_triple_index.py)
import build_triple_index  # noqa: E402

print("built", build_triple_index.build())
