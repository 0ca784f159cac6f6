"""parscale.runtime.memory: the page advice after load never changes what a mapping reads."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from parscale.runtime.memory import advise_random_access, limit_malloc_retention

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


def test_malloc_limit_is_idempotent():
    assert limit_malloc_retention() == limit_malloc_retention()
