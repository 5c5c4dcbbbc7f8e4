"""Loads the compiled op library and says how to build it when it is missing."""

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
