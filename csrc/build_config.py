"""What gfmrag_fast compiles and where it finds CUDA: the one description both builds use.

setup.py imports this file (the Python package, gfmrag_fast._C); CMakeLists.txt runs it to write a
CMake script it includes (the plain library, libgfmrag_fast_ops.so):

    python csrc/build_config.py cmake OUTPUT.cmake [--cuda]

which sets GFMRAG_SOURCES (absolute paths; the .cu files too with --cuda), GFMRAG_INCLUDE_DIRS,
GFMRAG_CUDA_HOME (empty when no toolkit is found) and GFMRAG_NVIDIA_INCLUDE_DIRS.
"""

import glob
import os
import shutil
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every file matching these is compiled, in sorted order; new kernel files need no build edit.
CPP_SOURCE_GLOBS = ("csrc/*.cpp", "csrc/cpu/*.cpp")
CUDA_SOURCE_GLOBS = ("csrc/cuda/*.cu",)
INCLUDE_DIRS = ("csrc",)


def sources(cuda: bool, absolute: bool = False) -> list:
    """The files to compile, relative to the repository root (setuptools wants that) or absolute."""
    found = []
    for pattern in CPP_SOURCE_GLOBS + (CUDA_SOURCE_GLOBS if cuda else ()):
        found += sorted(glob.glob(os.path.join(ROOT, pattern)))
    return found if absolute else [os.path.relpath(path, ROOT) for path in found]


def include_dirs() -> list:
    return [os.path.join(ROOT, d) for d in INCLUDE_DIRS]


def find_cuda_home():
    """The real CUDA toolkit folder, or None: CUDA_HOME, CUDA_PATH, the folder two levels above the
    resolved nvcc on PATH (nvcc may be a link or wrapper outside the toolkit), /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def nvidia_include_dirs() -> list:
    """CUDA library headers (cuBLAS, cuSPARSE...) shipped in the torch wheel's nvidia packages: a
    toolkit may lack them."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _cmake_list(name: str, values) -> str:
    quoted = " ".join('"' + v.replace("\\", "/").replace('"', '\\"') + '"' for v in values)
    return f"set({name} {quoted})\n"


def write_cmake(path: str, cuda: bool) -> None:
    text = "# Written by csrc/build_config.py: do not edit.\n"
    text += _cmake_list("GFMRAG_SOURCES", sources(cuda, absolute=True))
    text += _cmake_list("GFMRAG_INCLUDE_DIRS", include_dirs())
    text += _cmake_list("GFMRAG_CUDA_HOME", [find_cuda_home() or ""])
    text += _cmake_list("GFMRAG_NVIDIA_INCLUDE_DIRS", nvidia_include_dirs())
    with open(path, "w") as f:
        f.write(text)


def main(argv) -> int:
    args = [a for a in argv if a != "--cuda"]
    if len(args) != 2 or args[0] != "cmake":
        print("usage: python csrc/build_config.py cmake OUTPUT.cmake [--cuda]", file=sys.stderr)
        return 2
    write_cmake(args[1], "--cuda" in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
