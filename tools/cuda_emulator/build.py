"""Builds the CPU emulation of the CUDA kernels in csrc/cuda (see README.md).

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

# Emulated kernel files: name -> whether their 16-byte pack accesses are checked and counted.
KERNELS = {"rel_aggregate": True, "dense_tail": False}


def emulated_source(name: str, check_packs: bool) -> str:
    """The .cu as plain C++: launches become emu_launch calls, CUDA headers go, registration moves
    to the gfmrag_emu namespace, and the grid-size cap becomes settable at run time."""
    src = open(os.path.join(REPO, "csrc", "cuda", f"{name}_cuda.cu")).read()
    src = re.sub(r"#include <c10/cuda/[^>]*>\n", "", src)
    src, n = re.subn(r"(\w+(?:<[^<>]*>)?)\s*<<<(.*?)>>>\(", lambda m: f"emu_launch({m.group(2)}, {m.group(1)}, ",
                     src, flags=re.S)
    print(f"{name}: launches replaced: {n}", file=sys.stderr)
    i = src.index("TORCH_LIBRARY_IMPL(gfmrag_fast, CUDA, m)")
    j = src.index("}", i)
    src = src[:i] + open(os.path.join(HERE, f"register_{name}.inc")).read() + src[j:]
    if check_packs:
        # alignment check + counters on every pack access
        chk = ('if (reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, V>) != 0) throw std::runtime_error("misaligned '
               'pack access"); (V > 1 ? g_vec_access : g_scalar_access)++;\n  ')
        for old in ("return *reinterpret_cast<const Pack<T, V>*>(p);", "*reinterpret_cast<Pack<T, V>*>(p) = value;"):
            assert src.count(old) == 1, old
            src = src.replace(old, chk + old)
    old = "constexpr int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();"
    assert src.count(old) == 1, (name, old)
    src = src.replace(old, "int64_t& kMaxGridBlocks = g_max_grid_blocks;")
    return '#include "emu_runtime.h"\n' + src


sources = [os.path.join(HERE, "emu.cpp")]
for name, check_packs in KERNELS.items():
    path = os.path.join(BUILD, f"emu_{name}.cpp")
    text = emulated_source(name, check_packs)
    if not os.path.exists(path) or open(path).read() != text:  # unchanged files keep their objects
        open(path, "w").write(text)
    sources.append(path)

# --- compile it against the package's own library (the shared input checks live there)
SO_DIR = os.path.join(REPO, "gfmrag_fast")
torch.ops.load_library(os.path.join(SO_DIR, "_C.so"))
load(name="gfmrag_emu", sources=sources,
     extra_cflags=["-O1", "-std=c++20", f"-I{HERE}", f"-I{os.path.join(REPO, 'csrc', 'cuda')}"],
     extra_ldflags=[f"-L{SO_DIR}", "-l:_C.so", f"-Wl,-rpath,{SO_DIR}"], is_python_module=False,
     build_directory=BUILD, verbose=False)
print("built", torch.ops.gfmrag_emu.rel_aggregate, torch.ops.gfmrag_emu.dense_tail_norm)

# --- csrc/cuda/triple_index_cuda.cu: a library of its own (build_triple_index.py)
import build_triple_index  # noqa: E402

print("built", build_triple_index.build())
