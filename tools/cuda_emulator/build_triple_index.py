"""Builds the CPU emulation of csrc/cuda/triple_index_cuda.cu (see README.md).

    python tools/cuda_emulator/build_triple_index.py   # build.py runs it too

The .cu becomes plain C++ (launches become emu_launch calls, outputs of at::empty start with a
pattern, CUDA headers go), compiled with triple_index_emu.cpp. Its header triple_index.h is
copied with ``__CUDA_ARCH__`` renamed to a macro the emulation defines, so the device branches
run. The ops register as gfmrag_emu::negative_sampling and gfmrag_emu::easy_edge_mask, with the
schemas of csrc/triple_index.cpp.
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(HERE, "build", "triple_index")
LIBRARY = os.path.join(BUILD, "gfmrag_emu_triple_index.so")

# What one-thread-at-a-time emulation cannot run faithfully.
UNSUPPORTED = re.compile(r"__shfl|__sync|__shared__|__ballot|__any_sync|__all_sync|atomic\w*\(|cooperative_groups")


def _schemas(op_names):
    """The m.def schema strings of `op_names` in csrc/triple_index.cpp (adjacent literals joined)."""
    src = open(os.path.join(REPO, "csrc", "triple_index.cpp")).read()
    schemas = {}
    for call in re.finditer(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", src):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call.group(1)))
        schemas[schema.split("(", 1)[0]] = schema
    missing = [op for op in op_names if op not in schemas]
    if missing:
        sys.exit(f"build_triple_index: no schema for {missing} in csrc/triple_index.cpp")
    return [schemas[op] for op in op_names]


def translate() -> str:
    """triple_index_cuda.cu as plain C++ for triple_index_emu.cpp; writes the header copy."""
    src = open(os.path.join(REPO, "csrc", "cuda", "triple_index_cuda.cu")).read()
    bad = sorted(set(UNSUPPORTED.findall(src)))
    if bad:
        sys.exit(f"build_triple_index: the kernels use {bad}, which this emulation runs one thread at a time: "
                 "extend triple_index_emu.cpp (run lanes in lockstep as emu.cpp does)")
    header = open(os.path.join(REPO, "csrc", "triple_index.h")).read()
    open(os.path.join(BUILD, "triple_index_emu.h"), "w").write(header.replace("__CUDA_ARCH__", "GFMRAG_EMU_CUDA_ARCH"))
    src = src.replace("__CUDA_ARCH__", "GFMRAG_EMU_CUDA_ARCH")
    src, n = re.subn(r'#include "\.\./triple_index\.h"', '#include "triple_index_emu.h"', src)
    assert n == 1, "the .cu must include ../triple_index.h"
    src = re.sub(r"#include <(?:ATen/cuda|c10/cuda)/[^>]*>\n", "", src)

    def launch(m):
        config = [part.strip() for part in m.group(2).split(",")]
        assert len(config) == 4, f"launch {m.group(0)!r}: expected <<<grid, block, shmem, stream>>>"
        return f"emu_launch({', '.join(config)}, {m.group(1)}, "

    src, launches = re.subn(r"(\w+(?:<[^<>]*>)?)\s*<<<(.*?)>>>\(", launch, src, flags=re.S)
    src, empties = re.subn(r"\bat::empty\(", "emu_empty(", src)
    start = src.index("TORCH_LIBRARY_IMPL(gfmrag_fast, CUDA, m)")
    end = src.index("}", start)
    impls = re.findall(r'm\.impl\("(\w+)"', src[start:end])
    defs = "".join(f'  m.def("{schema}");\n' for schema in _schemas(impls))
    registration = (f"TORCH_LIBRARY_FRAGMENT(gfmrag_emu, m) {{\n{defs}}}\n\n"
                    + src[start:end].replace("TORCH_LIBRARY_IMPL(gfmrag_fast, CUDA, m)", "TORCH_LIBRARY_IMPL(gfmrag_emu, CPU, m)"))
    src = src[:start] + registration + src[end:]
    print(f"triple_index_cuda.cu: {launches} launches, {empties} at::empty outputs, ops {impls}", file=sys.stderr)
    return src


def build() -> str:
    """Translates and compiles the emulation; returns the library's path."""
    import torch
    from torch.utils.cpp_extension import load

    os.makedirs(BUILD, exist_ok=True)
    open(os.path.join(BUILD, "triple_index_emu_body.inc"), "w").write(translate())
    so_dir = os.path.join(REPO, "gfmrag_fast")
    torch.ops.load_library(os.path.join(so_dir, "_C.so"))  # the shared input checks live there
    load(name="gfmrag_emu_triple_index", sources=[os.path.join(HERE, "triple_index_emu.cpp")],
         extra_cflags=["-O1", "-std=c++20", "-fvisibility=hidden", "-DGFMRAG_EMU_CUDA_ARCH=900", f"-I{BUILD}"],
         extra_ldflags=[f"-L{so_dir}", "-l:_C.so", f"-Wl,-rpath,{so_dir}"], is_python_module=False,
         build_directory=BUILD, verbose=False)
    return LIBRARY


if __name__ == "__main__":
    print("built", build())
