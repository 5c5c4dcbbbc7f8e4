"""Builds gfmrag_fast._C: the C++ CPU kernels always, the CUDA kernels when asked or available.

Build switches (environment variables):
  FORCE_CUDA=1       build the CUDA kernels (fails if no CUDA toolkit is found)
  FORCE_ONLY_CPU=1   never build the CUDA kernels
  (neither)          build them when torch is a CUDA build and a CUDA toolkit is found;
                     whether a GPU is visible does not matter
  CUDA_HOME          the CUDA toolkit folder; found from nvcc when unset
  TORCH_CUDA_ARCH_LIST, MAX_JOBS   honoured as by torch.utils.cpp_extension
  DEBUG=1            -O0 -g, no NDEBUG
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup


def _find_cuda_home():
    """The real toolkit folder. nvcc on PATH may be a wrapper script or a link outside it."""
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


_cuda_home = _find_cuda_home()
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def _want_cuda():
    if os.environ.get("FORCE_ONLY_CPU", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if _cuda_home is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        if torch.version.cuda is None:
            sys.exit("FORCE_CUDA=1 but the installed torch is a CPU-only build")
        return True
    return torch.version.cuda is not None and _cuda_home is not None


def _extra_cuda_includes():
    """CUDA library headers shipped in the torch wheel's nvidia packages (cuBLAS, cuSPARSE...)."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx_flags = opt + ["-fopenmp"]
    if not DEBUG:
        cxx_flags.append("-DNDEBUG")
    extra = {"cxx": cxx_flags}
    kwargs = dict(
        name="gfmrag_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("GFMRAG_FAST_PYTHON_MODULE", None)],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-DNDEBUG" if not DEBUG else "-G"]
        kwargs["include_dirs"] += _extra_cuda_includes()
        print(f"gfmrag_fast: building CPU and CUDA kernels (CUDA_HOME={_cuda_home})")
        return CUDAExtension(sources=sources, extra_compile_args=extra, **kwargs)
    print("gfmrag_fast: building CPU kernels only")
    return CppExtension(sources=sources, extra_compile_args=extra, **kwargs)


class _BuildExt(BuildExtension.with_options(no_python_abi_suffix=True)):
    def finalize_options(self):
        super().finalize_options()
        # One fixed object folder: pip's editable builds would compile in a new temporary folder
        # every time; with this one ninja recompiles only the sources that changed.
        self.build_temp = os.path.join(ROOT, "build", "ext")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
