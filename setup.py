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

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    """csrc/build_config.py: the source list, include folders and CUDA search CMakeLists.txt uses too."""
    path = os.path.join(ROOT, "csrc", "build_config.py")
    spec = importlib.util.spec_from_file_location("gfmrag_fast_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()
_cuda_home = build_config.find_cuda_home()
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

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


def _extension():
    with_cuda = _want_cuda()
    sources = build_config.sources(cuda=with_cuda)
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx_flags = opt + ["-fopenmp"]
    if not DEBUG:
        cxx_flags.append("-DNDEBUG")
    extra = {"cxx": cxx_flags}
    kwargs = dict(
        name="gfmrag_fast._C",
        include_dirs=build_config.include_dirs(),
        define_macros=[("GFMRAG_FAST_PYTHON_MODULE", None)],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        extra["nvcc"] = opt + ["-lineinfo", "--expt-relaxed-constexpr", "-DNDEBUG" if not DEBUG else "-G"]
        kwargs["include_dirs"] += build_config.nvidia_include_dirs()
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
