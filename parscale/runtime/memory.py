"""Keep peak RSS near the size of the weights (Linux/glibc; elsewhere these are no-ops), and refuse a KV
cache that cannot fit in the memory available before it is allocated (`check_cache_fits`).

Measured on qwen2.5-0.5b P=4 fp32 (2.0 GB of weights), prompt 128 (benchmarks/README.md):

- glibc raises its mmap threshold each time a large block is freed, so after the first step the
  10-MB activations of prefill come from the heap and pile up before they are trimmed: +280 MB of
  peak RSS. Fixing the threshold at 1 MiB makes every large tensor an mmap that returns to the OS
  when freed (+95 MB, all of it live activations). `limit_malloc_retention` does that.
- ONNX Runtime maps external data and uses the embedding table in place (the tied LM head gets
  its own prepacked copy). Each row lookup then faulted in a whole large folio of the page cache
  (ext4 builds 2-MB folios when the file is read at load): 128 random ids mapped 172 MB.
  `advise_random_access` marks such mappings MADV_RANDOM and drops their cached pages, so a
  lookup maps about one page per row (1 MB for the same prompt).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from parscale.errors import ParScaleError

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MADV_RANDOM = 1
MADV_DONTNEED = 4
MMAP_THRESHOLD_BYTES = 1 << 20
MIN_TABLE_BYTES = 1 << 20  # smaller mappings (biases, norms) are read whole anyway

_malloc_done = False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def limit_malloc_retention() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (once per process); False where not glibc or opted out.

    Set PARSCALE_KEEP_MALLOC=1 to leave the host process's allocator settings alone.
    """
    global _malloc_done
    if _malloc_done:
        return True
    if os.environ.get("PARSCALE_KEEP_MALLOC") == "1":
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:  # musl and others have no mallopt
        return False
    _malloc_done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _malloc_done


def advise_random_access(data_file: Path) -> int:
    """MADV_RANDOM + drop cached pages for this process's mappings of `data_file`; returns bytes advised.

    Only mappings ONNX Runtime still holds after session creation remain (tensors it reads in place,
    such as embedding tables); prepacked weights were copied and unmapped. Pages another process has
    mapped are not dropped (the kernel skips them), so this never slows a second process down much.
    """
    libc = _libc()
    if libc is None or not hasattr(os, "posix_fadvise"):
        return 0
    target = str(Path(data_file).resolve())
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    try:
        regions = _mappings(target)
        fd = os.open(target, os.O_RDONLY)
    except OSError:
        return 0
    try:
        for lo, hi, offset, anonymous in regions:
            if hi - lo < MIN_TABLE_BYTES:
                continue
            if anonymous == 0:
                # No page of the mapping was ever written (no copy-on-write copies), so MADV_DONTNEED
                # only unmaps clean file pages, which fault back in from the file. It releases what
                # session creation touched, e.g. a tied table read to prepack the LM head.
                libc.madvise(lo, hi - lo, MADV_DONTNEED)
            if libc.madvise(lo, hi - lo, MADV_RANDOM) == 0:
                os.posix_fadvise(fd, offset, hi - lo, os.POSIX_FADV_DONTNEED)
                advised += hi - lo
    finally:
        os.close(fd)
    return advised


def _mappings(path: str) -> list[tuple[int, int, int, int]]:
    """(start, end, file offset, anonymous kB) of this process's mappings of `path` (/proc/self/smaps)."""
    regions: list[list[int]] = []
    current = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                current = len(fields) == 6 and fields[5].strip() == path
                if current:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    regions.append([lo, hi, int(fields[2], 16), 0])
            elif current and fields[0] == "Anonymous:":
                regions[-1][3] = int(fields[1])
    return [(lo, hi, off, anon) for lo, hi, off, anon in regions]


def available_bytes() -> int | None:
    """Memory the machine can give this process now (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cache_bytes(info: Any, sequences: int, tokens: int) -> int:
    """Bytes of the KV cache (every layer's keys and values, prefix rows included) and the logits buffers
    for `sequences` sequences of up to `tokens` tokens, with `info` a `GraphInfo` at the P to run."""
    rows = (info.prefix_rows or 0) + tokens
    kv = 2 * info.num_layers * sequences * info.cache_heads * rows * info.head_dim * np.dtype(info.cache_dtype).itemsize
    return kv + 2 * sequences * info.vocab_size * 4


def check_cache_fits(info: Any, sequences: int, tokens: int) -> None:
    """Refuse, before anything is allocated, a batch whose KV cache cannot fit in the memory available:
    numpy would otherwise commit it page by page until the kernel kills the process."""
    need, free = cache_bytes(info, sequences, tokens), available_bytes()
    if free is not None and need > free:
        gib = 1 << 30
        raise ParScaleError(
            f"{sequences} sequence(s) of up to {tokens} tokens need {need / gib:.1f} GiB for the KV cache, but "
            f"{free / gib:.1f} GiB of memory are available: use a smaller batch, a shorter prompt or fewer new tokens")
