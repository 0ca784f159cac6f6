"""Refuse exports whose floating-point weights hold NaN or Inf, naming the tensor; without onnx.

The runtime must stay onnx-free, and ONNX Runtime does not hand back initializers, so this reads the
few protobuf fields it needs straight from `model.onnx` (the wire format is stable and public):
ModelProto.graph -> GraphProto.initializer (and the tensors of Constant nodes) -> TensorProto
name, data_type, raw_data / float_data, or external_data (location, offset, length) in a data file.

The check is a bit test on the exponent field (all ones = Inf or NaN), chunked so that memory stays
flat; a NaN anywhere in a weight makes every logit NaN, which then silently decodes as token 0.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from parscale.errors import ParScaleError

# TensorProto.DataType -> (unsigned view dtype, exponent mask): FLOAT, FLOAT16, DOUBLE, BFLOAT16.
FLOAT_TYPES = {
    1: (np.uint32, 0x7F800000), 10: (np.uint16, 0x7C00), 11: (np.uint64, 0x7FF0000000000000), 16: (np.uint16, 0x7F80),
}
CHUNK = 1 << 24  # elements per bit test


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values as views."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, wire, value
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            yield number, wire, buf[i:i + n]
            i += n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _tensors(graph: memoryview) -> Iterator[memoryview]:
    """TensorProto messages of a graph: initializers and Constant nodes' `value` tensors."""
    for number, _, value in fields(graph):
        if number == 5 and isinstance(value, memoryview):  # GraphProto.initializer
            yield value
        elif number == 1 and isinstance(value, memoryview):  # GraphProto.node -> attribute -> t
            for n2, _, attr in fields(value):
                if n2 == 5 and isinstance(attr, memoryview):
                    for n3, _, t in fields(attr):
                        if n3 == 5 and isinstance(t, memoryview):
                            yield t


def _nonfinite(data: np.ndarray, view: type, mask: int) -> bool:
    arr = data.view(view)
    m = view(mask)
    return any(bool(((arr[k:k + CHUNK] & m) == m).any()) for k in range(0, arr.size, CHUNK))


def find_nonfinite(model_path: Path) -> str | None:
    """Name of the first floating-point weight with a NaN or Inf, else None. Raises on unreadable files.

    Reads raw_data, float_data (FLOAT), double_data (DOUBLE) and external data; fp16/bf16 values kept
    in int32_data are not read (exporters, ours included, write raw_data).
    """
    folder = model_path.parent
    with open(model_path, "rb") as f:
        # Not closed explicitly: numpy views of the map may outlive this loop; it closes when they go.
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    data_files: dict[str, np.memmap] = {}
    graph = next((v for n, _, v in fields(buf) if n == 7 and isinstance(v, memoryview)), None)
    if graph is None:
        raise ValueError("no graph")
    for tensor in _tensors(graph):
        name, kind, chunks, external = "?", 0, [], {}
        for n, _, v in fields(tensor):
            if n == 8 and isinstance(v, memoryview):
                name = bytes(v).decode(errors="replace")
            elif n == 2 and isinstance(v, int):
                kind = v
            elif isinstance(v, memoryview) and (n == 9 or (n == 4 and kind in (0, 1)) or (n == 10 and kind in (0, 11))):
                chunks.append(v)  # raw_data; packed float_data / double_data (field 2 comes first)
            elif n == 13 and isinstance(v, memoryview):
                entry = {k: bytes(x).decode(errors="replace") for k, _, x in fields(v) if isinstance(x, memoryview)}
                external[entry.get(1, "")] = entry.get(2, "")
        if kind not in FLOAT_TYPES:
            continue
        view, mask = FLOAT_TYPES[kind]
        if external:
            chunks.append(_external(folder, external, data_files))
        for c in chunks:
            arr = np.frombuffer(c, dtype=np.uint8) if isinstance(c, memoryview) else c
            arr = arr[: arr.size - arr.size % np.dtype(view).itemsize]
            if _nonfinite(arr, view, mask):
                return name
    return None


def _external(folder: Path, entry: dict[str, str], cache: dict[str, np.memmap]) -> np.ndarray:
    location = entry.get("location", "")
    path = (folder / location).resolve()
    if not location or folder.resolve() not in path.parents or not path.is_file():
        raise ValueError(f"external data {location!r} is not a file in the export folder")
    if location not in cache:
        cache[location] = np.memmap(path, dtype=np.uint8, mode="r")
    data = cache[location]
    offset = int(entry.get("offset", "0") or 0)
    length = int(entry["length"]) if entry.get("length") else data.size - offset
    if offset < 0 or length < 0 or offset + length > data.size:
        raise ValueError(f"external data range {offset}+{length} lies outside {location}")
    return np.asarray(data[offset:offset + length])


def check_finite(model_path: Path) -> None:
    """Raise ParScaleError naming the first weight of `model_path` that holds NaN or Inf."""
    try:
        bad = find_nonfinite(model_path)
    except (ValueError, OSError, struct.error) as e:
        raise ParScaleError(f"cannot read the weights of {model_path}: {e}; re-export the model") from None
    if bad is not None:
        raise ParScaleError(
            f"{model_path}: weight {bad!r} holds NaN or Inf values; the model cannot produce meaningful "
            "output. Fix the checkpoint (or the training run) and export again"
        )
