"""Reading and writing export graphs whose weights may live in `model.onnx.data`.

An in-memory proto here holds the graph's structure; its large tensors may still refer to the
external-data file of the folder it was read from. Weights are read one tensor at a time, and a
graph is written with its weights as external data once they pass a threshold: protobuf cannot
hold 2 GB, and ONNX Runtime maps external data instead of copying it out of a parsed protobuf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from parscale.manifest import EXTERNAL_DATA, MODEL_FILE

# Above this many weight bytes an export's weights go to EXTERNAL_DATA (a parameter of `export`,
# so that tests can take the large-model path with small models).
EXTERNAL_DATA_THRESHOLD = 64 << 20


def read_tensor(t: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The values of an initializer, read from `base_dir`'s external-data file when stored there.

    The proto is left as it is (onnx's own loader would copy the bytes into it, so that reading
    every weight once would end with all of them in memory).
    """
    if not external_data_helper.uses_external_data(t):
        return numpy_helper.to_array(t)
    if base_dir is None:
        raise ValueError(f"tensor {t.name} is stored as external data, but no folder was given")
    info = {e.key: e.value for e in t.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims)) if t.dims else 1
    data = np.fromfile(Path(base_dir) / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if data.size != count:
        raise ValueError(f"tensor {t.name}: {info['location']} is cut short")
    return data.reshape(tuple(t.dims))


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers, wherever they are stored."""
    total = 0
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def load_external(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Bring the tensors that still refer to `base_dir`'s external data into the proto."""
    for t in proto.graph.initializer:
        if external_data_helper.uses_external_data(t):
            external_data_helper.load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def graph_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The graph's metadata: the manifest (less the file list and the validation results)."""
    return {"parscale": json.dumps(meta)}


def set_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Record the manifest (less the file list and the validation results) in the graph."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, graph_metadata(meta))


def save_graph(proto: onnx.ModelProto, folder: Path, *, external_threshold: int) -> None:
    """Write `proto` (all its tensors in memory) as `folder/model.onnx`, large weights as external data.

    The proto is consumed: its tensors now refer to the written file.
    """
    external = weight_bytes(proto) > external_threshold
    onnx.save_model(
        proto, folder / MODEL_FILE, save_as_external_data=external, all_tensors_to_one_file=True,
        location=EXTERNAL_DATA, size_threshold=1024,
    )


def rewrite_structure(folder: Path, meta: dict[str, Any]) -> None:
    """Set the metadata of `folder/model.onnx` without reading or rewriting its external weights."""
    path = folder / MODEL_FILE
    proto = onnx.load(str(path), load_external_data=False)
    set_metadata(proto, meta)
    onnx.save_model(proto, str(path))
