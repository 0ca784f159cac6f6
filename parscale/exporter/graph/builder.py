"""A small ONNX graph builder whose weights stream to an external-data file as they are added.

The fused decoder (`decoder.py`) is written node by node with it. Weights never pile up in memory:
each one goes to `model.onnx.data` when it is added (the proto keeps only its location), so
building a 3B graph needs memory for one weight beside the module. Small tensors (shape
constants, norms) stay inside the proto.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from parscale.exporter.graphfile import load_external
from parscale.manifest import EXTERNAL_DATA, MODEL_FILE

MS_DOMAIN = "com.microsoft"
QUANT_KEY = "parscale.quantize"  # node metadata: "weight name|calibration path" of a quantizable MatMul/Gather
EMBED_WEIGHT = "model.embed_tokens.weight"
_INLINE_BYTES = 1024  # tensors up to this size stay in the proto
_ALIGN = 4096  # external tensors start on a page: ONNX Runtime can map them in place


class GraphBuilder:
    """Nodes, inputs, outputs and initializers of one graph; `save` writes it to a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []  # shapes declared for inner tensors (`declare`)
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._data = open(folder / EXTERNAL_DATA, "wb")  # noqa: SIM115 (closed by save)
        self.external_bytes = 0

    # ------------------------------------------------------------------ values

    def input(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def declare(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        """State the shape of an inner tensor whose shape inference cannot name (a Reshape to -1 rows, an `If`
        output). ONNX Runtime reuses an activation buffer only for tensors of provably equal shape: with the
        arena off (`driver.session_options`) every unnamed one is a fresh allocation, paid for in page faults
        (benchmarks/results/rows.md: a 128-token prefill of a P=1,4 graph, before and after)."""
        self.value_info.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer; stored in the external-data file unless it is tiny."""
        array = np.asarray(array) if np.asarray(array).flags.c_contiguous else np.array(array, order="C")
        if array.nbytes <= _INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        pad = -self._data.tell() % _ALIGN
        self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(array.tobytes())
        self.external_bytes += array.nbytes
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", EXTERNAL_DATA), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        self.initializers.append(t)
        return name

    def const(self, value: np.ndarray | list[int] | int | float, dtype: type = np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared between the nodes that use the same one."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), array)
        return self._consts[key]

    def fresh(self, hint: str) -> str:
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ nodes

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, **attrs: object) -> str:
        """Add a node; returns its (first) output's name. `outputs` may name them, or count them."""
        return self.ops(op_type, *inputs, outputs=outputs, domain=domain, name=name, **attrs)[0]

    def ops(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "",
            name: str | None = None, **attrs: object) -> list[str]:
        """Add a node; returns all its output names (an empty name: an output it does not produce)."""
        node_name = self.fresh(name or op_type)
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{node_name}/out{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=node_name, domain=domain or None,
                                           **attrs))
        return outputs

    def branch(self, cond: str, then_body: Callable[[], list[str]], else_body: Callable[[], list[str]],
               outputs: list[str]) -> list[str]:
        """An `If` node: `then_body()`'s nodes run when `cond` (a one-element bool) holds, else `else_body()`'s.

        Each branch is a subgraph holding only the nodes its body adds; the weights and constants it
        uses stay in the outer graph. Its outputs are named by `outputs`.
        """
        graphs = []
        for body in (then_body, else_body):
            saved, self.nodes = self.nodes, []
            try:
                results = body()
                graphs.append(helper.make_graph(self.nodes, self.fresh("branch"), [],
                                                [helper.make_empty_tensor_value_info(r) for r in results]))
            finally:
                self.nodes = saved
        return self.ops("If", cond, outputs=outputs, then_branch=graphs[0], else_branch=graphs[1])

    def switch(self, key: str, cases: list[int], body: Callable[[int], list[str]], outputs: list[str]) -> list[str]:
        """Nested `If` nodes that run `body(case)`'s nodes for the case equal to `key` (an int64 [1]).

        The last case is the final else: a key matching no case runs it.
        """
        if len(cases) == 1:
            return [self.op("Identity", o, outputs=[name]) for o, name in zip(body(cases[0]), outputs, strict=True)]
        first, rest = cases[0], cases[1:]
        return self.branch(
            self.op("Equal", key, self.const([first])),
            lambda: body(first),
            lambda: body(rest[0]) if len(rest) == 1 else self.switch(key, rest, body,
                                                                        [self.fresh("case") for _ in outputs]),
            outputs)

    # ------------------------------------------------------------------ writing

    def save(self, opset: int, *, external_threshold: int, metadata: dict[str, str] | None = None,
             node_metadata: dict[str, dict[str, str]] | None = None) -> onnx.ModelProto:
        """Write `folder/model.onnx`; weights stay in the external-data file above the threshold."""
        self._data.close()
        graph = helper.make_graph(self.nodes, "parscale", self.inputs, self.outputs, self.initializers,
                                  value_info=self.value_info)
        for node in graph.node:
            for key, value in (node_metadata or {}).get(node.name, {}).items():
                node.metadata_props.add(key=key, value=value)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="parscale")
        proto.ir_version = 10
        if metadata:
            helper.set_model_props(proto, metadata)
        data = self.folder / EXTERNAL_DATA
        if self.external_bytes <= external_threshold:
            load_external(proto, self.folder)
            data.unlink()
        onnx.save_model(proto, str(self.folder / MODEL_FILE))
        return proto
