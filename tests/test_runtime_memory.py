"""parscale.runtime.memory: the page advice after load never changes what a mapping reads, and the
malloc setting really makes large blocks mmaps."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from parscale.runtime.memory import advise_random_access

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page advice")


def test_advice_keeps_read_only_mapping_contents(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:4096] == data[:4096].tobytes()  # touch a page
        assert advise_random_access(path) == 4 << 20
        assert m[:] == data.tobytes()  # pages fault back in from the file


def test_advice_keeps_written_private_pages(tmp_path):
    path = tmp_path / "model.onnx.data"
    path.write_bytes(bytes(4 << 20))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        m[:5] = b"dirty"  # a copy-on-write page: MADV_DONTNEED would lose it, so it must be skipped
        advise_random_access(path)
        assert m[:5] == b"dirty"


# Run in a fresh interpreter: the test process may already have fixed the threshold (Model.load does).
# glibc raises its mmap threshold to the size of a freed mmapped block, so after freeing 8 MiB a
# 4-MiB block comes from the heap, unless the threshold was fixed at 1 MiB.
MMAP_PROBE = """
import ctypes, sys
from parscale.runtime.memory import limit_malloc_retention

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

try:
    libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    libc = None
if not hasattr(libc, "mallinfo2"):
    print("no-mallinfo2")
    sys.exit()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "limit":
    assert limit_malloc_retention() and limit_malloc_retention()  # once per process, then a no-op
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
print("mmap" if libc.mallinfo2().hblkhd - before >= 4 << 20 else "heap")
libc.free(block)
"""


def test_malloc_limit_makes_large_blocks_mmaps_that_return_to_the_os():
    env = {k: v for k, v in os.environ.items() if k != "PARSCALE_KEEP_MALLOC"}
    seen = {}
    for mode in ("default", "limit"):
        done = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        seen[mode] = done.stdout.strip()
    if seen["default"] == "no-mallinfo2":
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    assert seen == {"default": "heap", "limit": "mmap"}


def test_malloc_limit_respects_the_opt_out():
    code = "from parscale.runtime.memory import limit_malloc_retention as f; print(f())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PARSCALE_KEEP_MALLOC": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
