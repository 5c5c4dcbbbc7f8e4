"""Loads the compiled op library and says how to build it when it is missing; the CPU output
buffer cache's switch."""

import os

import torch

_BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(add FORCE_CUDA=1 for the CUDA kernels, see README)"
)

try:
    from gfmrag_fast import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only in broken installs
    raise ImportError(f"gfmrag_fast's compiled library gfmrag_fast._C is not built: {_BUILD_HINT}") from exc


# Read once: the answer cannot change after the library is loaded, and torch.compile cannot trace
# the dispatcher query.
_KERNEL_DEVICE_TYPES = frozenset(
    device_type
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("gfmrag_fast::rel_aggregate", key)
)


def has_kernels_for(device: torch.device) -> bool:
    """Whether the compiled library holds kernels for `device`'s type (CPU always does)."""
    return device.type in _KERNEL_DEVICE_TYPES


def check_device_supported(device: torch.device) -> None:
    if not has_kernels_for(device):
        if device.type == "cuda":
            raise RuntimeError(
                "gfmrag_fast was built without CUDA kernels but got CUDA tensors: reinstall with "
                "`FORCE_CUDA=1 pip install --no-build-isolation -e .` on a machine with a CUDA toolkit"
            )
        raise RuntimeError(f"gfmrag_fast has no kernels for device type '{device.type}'")


OUTPUT_CACHE_ENV = "GFMRAG_FAST_OUTPUT_CACHE_MB"


def set_output_cache(megabytes: int) -> None:
    """Limits the memory kept for large CPU op outputs to `megabytes` MiB; 0 turns the cache off.

    Outputs of 4 MiB or more (rel_aggregate's result and gradients) come from a cache of freed
    buffers, so that a training step does not pay the OS's page faults and zeroing for fresh memory
    on every call; the kept buffers count towards the process's memory. The default is 256 MiB, or
    the value of the environment variable GFMRAG_FAST_OUTPUT_CACHE_MB when the library is loaded.
    Lowering the limit frees kept buffers beyond it at once.
    """
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 0:
        raise ValueError(f"set_output_cache: megabytes must be an int >= 0 (0 turns the cache off), got {megabytes!r}")
    torch.ops.gfmrag_fast.output_cache_limit(megabytes)


def output_cache_info() -> dict:
    """The CPU output buffer cache: {"limit_mb": float, "cached_mb": float, "buffers": int}."""
    limit, cached, buffers = torch.ops.gfmrag_fast.output_cache_stats()
    return {"limit_mb": limit / 2**20, "cached_mb": cached / 2**20, "buffers": buffers}


def _output_cache_from_env() -> None:
    value = os.environ.get(OUTPUT_CACHE_ENV)
    if value is None or value.strip() == "":
        return
    try:
        megabytes = int(value)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ValueError(f"{OUTPUT_CACHE_ENV} must be a whole number of MiB >= 0 (0 turns the CPU output cache off), "
                         f"got {value!r}")
    set_output_cache(megabytes)


_output_cache_from_env()
