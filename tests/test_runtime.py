"""gfmrag_fast.runtime.configure_allocator: each case in a fresh interpreter, since malloc's settings
are process-wide and the function acts once per process."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates a 64 MiB block through malloc and reports whether it lies in the heap ([heap] in
# /proc/self/maps, grown by brk) rather than in a mapping of its own.
PROBE = r"""
import ctypes, sys
from gfmrag_fast.runtime import configure_allocator
print(configure_allocator())
print(configure_allocator())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
address = libc.malloc(64 << 20)
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    lo, hi = (int(v, 16) for v in span.split("-"))
    if lo <= address < hi:
        print("heap" if line.rstrip().endswith("[heap]") else "mapping")
"""


def probe(**env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GFMRAG_FAST_MALLOC"}
    environ.update(env, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=60)
    return done


glibc_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(
    __import__("platform").libc_ver()), reason="glibc Linux only")


@glibc_linux
def test_large_blocks_come_from_the_heap():
    done = probe()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["glibc", "glibc", "heap"]


@glibc_linux
def test_default_malloc_maps_large_blocks():
    # The control: without the settings glibc gives a 64 MiB block its own mapping.
    done = probe(GFMRAG_FAST_MALLOC="system")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["opt-out", "opt-out", "mapping"]


@glibc_linux
def test_glibc_environment_variables_win():
    done = probe(MALLOC_MMAP_MAX_="4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["environment", "environment", "mapping"]


def test_bad_setting_is_named():
    done = probe(GFMRAG_FAST_MALLOC="fast")
    assert done.returncode != 0
    assert "GFMRAG_FAST_MALLOC must be 'reuse' or 'system', got 'fast'" in done.stderr
