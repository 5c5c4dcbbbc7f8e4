"""Process-wide settings that make CPU training steps faster: how glibc's malloc treats the large
blocks PyTorch allocates for node-sized tensors.

By default glibc serves every block of 128 KiB or more (a threshold that adapts upward, up to
32 MiB) with its own ``mmap`` and hands it back with ``munmap`` when freed, and gives free memory at
the top of the heap back to the system once more than 128 KiB is free there. A training step
allocates and frees dozens of [B, N, d] tensors (133 MiB each for B = 32, N = 16k, d = 64), so
every step maps them anew and the kernel page-faults and zero-fills every page of each on first
touch: on the 2-core machine the MuSiQue pre-training step took 4.3 s that way, 2.6 s with the
blocks kept in the heap and reused. :func:`configure_allocator` does that at run time, the
equivalent of starting the process with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``:

* ``M_MMAP_MAX = 0``: no block gets its own mapping; all come from the heap and are reused;
* ``M_TRIM_THRESHOLD = 2 GiB - 1`` (the largest value ``mallopt`` takes): free memory stays with
  the process unless more than that sits free at the top of the heap.

The cost: memory freed by the process stays counted in its resident size (it is reused by later
allocations, not returned to the system), so the resident size stays near the step's peak.

It changes nothing on other C libraries (macOS, musl) and on Windows, nor when the glibc variables
``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` are set (the user's
choice wins). Set ``GFMRAG_FAST_MALLOC=system`` to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
OPT_OUT_VARIABLE = "GFMRAG_FAST_MALLOC"
GLIBC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

_configured: Optional[str] = None


def configure_allocator() -> str:
    """Keeps large freed blocks in the process for reuse (see the module docstring).

    Idempotent; call it once at the start of a training or benchmark process. Returns what was
    done: ``"glibc"`` (settings applied), ``"opt-out"`` (``GFMRAG_FAST_MALLOC=system``),
    ``"environment"`` (glibc's own variables are set), or ``"unsupported"`` (not glibc).
    """
    global _configured
    if _configured is not None:
        return _configured
    choice = os.environ.get(OPT_OUT_VARIABLE, "reuse").strip().lower()
    if choice not in ("reuse", "system"):
        raise ValueError(f"{OPT_OUT_VARIABLE} must be 'reuse' or 'system', got {choice!r}")
    if choice == "system":
        _configured = "opt-out"
    elif any(name in os.environ for name in GLIBC_VARIABLES):
        _configured = "environment"
    else:
        libc = _glibc()
        if libc is None:
            _configured = "unsupported"
        else:
            # mallopt returns 1 on success, 0 on an invalid value.
            if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
                raise RuntimeError("glibc mallopt rejected M_MMAP_MAX = 0 / M_TRIM_THRESHOLD; "
                                   f"set {OPT_OUT_VARIABLE}=system to skip this")
            _configured = "glibc"
    return _configured


def _glibc() -> Optional[ctypes.CDLL]:
    """The running process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return libc
