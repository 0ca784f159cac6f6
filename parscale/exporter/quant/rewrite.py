"""The graph rewrite of quantization: the builder's marked MatMul / Gather nodes become ONNX Runtime's
quantized nodes (`policy` decides which kernel, `math` computes the codes), the float weights they
replace are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from parscale.errors import ParScaleError
from parscale.exporter.graph.builder import EMBED_WEIGHT, MS_DOMAIN, QUANT_KEY
from parscale.exporter.graphfile import read_tensor
from parscale.exporter.quant import math as qm
from parscale.exporter.quant.policy import INTEGER_KERNEL, INTEGER_TARGETS, QuantReport, QuantScheme
from parscale.modeling.model import PROJECTION_INPUTS


@dataclass
class _Targets:
    projections: list[tuple[onnx.NodeProto, str, str]]  # (MatMul, calibration path, weight name), B (K, N)
    lm_head: tuple[onnx.NodeProto, str, onnx.NodeProto | None]  # (MatMul, table name, Transpose when tied)
    embedding: tuple[onnx.NodeProto, str]  # (Gather, table name)


def _find_targets(graph: onnx.GraphProto, num_layers: int) -> _Targets:
    """The nodes to quantize: those the graph builder marked with `QUANT_KEY` metadata."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    marked = {n.name: p.value for n in graph.node for p in n.metadata_props if p.key == QUANT_KEY}
    projections, lm_heads, embeddings = [], [], []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gather") or node.name not in marked:
            continue
        weight, path = marked[node.name].split("|")
        if node.op_type == "Gather" and weight == EMBED_WEIGHT and node.input[0] in inits:
            embeddings.append((node, node.input[0]))
        elif node.op_type == "MatMul" and path.endswith("lm_head"):
            src = producer.get(node.input[1])
            if node.input[1] in inits:
                lm_heads.append((node, node.input[1], None))
            elif src is not None and src.op_type == "Transpose" and src.input[0] in inits:
                lm_heads.append((node, src.input[0], src))  # tied: MatMul(x, Transpose(table))
        elif node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            projections.append((node, path, weight))
    expected = len(PROJECTION_INPUTS) * num_layers  # packed q/k/v, o, packed gate/up, down
    if len(projections) != expected or len(lm_heads) != 1 or len(embeddings) != 1:
        # A silent partial quantization would be worse than none: say what was found.
        raise ParScaleError(
            f"cannot quantize: found {len(projections)} projections (expected {expected}), "
            f"{len(lm_heads)} LM heads and {len(embeddings)} embedding lookups (expected 1 each) in the "
            "graph; it may lack the exporter's metadata"
        )
    return _Targets(projections, lm_heads[0], embeddings[0])


class _Quantized(NamedTuple):
    bq: qm.BlockQuantized
    algorithm: str  # "gptq" or "rtn"
    dtype: np.dtype  # float type of the original weight: the scales' type


class _Quantizer:
    """Picks the algorithm per tensor: GPTQ where the scheme asks for it, else round-to-nearest."""

    def __init__(self, scheme: QuantScheme, hessians: Mapping[str, np.ndarray] | None) -> None:
        if scheme.method == "gptq" and hessians is None:
            raise ParScaleError("GPTQ needs calibration statistics (calibrate.LayerwiseHessians); none were given")
        self.scheme, self.hessians = scheme, hessians if hessians is not None else {}
        # The factor of the last statistic used: q/k/v and gate/up share one and come one after another
        # in the graph. Keeping only one bounds memory (0.5B: 24 factors of 4864^2 would be 2.3 GB).
        # The statistic is kept with its factor and compared by identity (an id() could be reused
        # once a layer-wise provider has freed the previous layer's arrays).
        self._factor: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, path: str | None, w: np.ndarray, bits: int) -> _Quantized:
        s, w32 = self.scheme, w.astype(np.float32, copy=False)
        if s.method == "gptq" and path is not None:  # path None: the embedding lookup, no matmul input
            try:
                h = self.hessians[path]
            except KeyError:
                raise ParScaleError(f"no calibration statistics for {path}") from None
            if self._factor is None or self._factor[0] is not h:
                self._factor = None  # free the previous factor before computing the next
                self._factor = (h, qm.gptq_factor(h))
            bq = qm.gptq_quantize(w32, self._factor[1], bits, s.block_size, symmetric=s.symmetric,
                                  scale_dtype=w.dtype)
            return _Quantized(bq, "gptq", w.dtype)
        # Clipping search measured a lower KL at 4 bits and no change at 8 (README: quantization).
        bq = qm.quantize_blockwise(w32, bits, s.block_size, symmetric=s.symmetric, scale_dtype=w.dtype,
                                   clip_search=bits == 4)
        return _Quantized(bq, "rtn", w.dtype)


def quantize_graph(
    proto: onnx.ModelProto, scheme: QuantScheme, num_layers: int, hessians: Mapping[str, np.ndarray] | None = None,
    *, base_dir: Path | None = None, progress: Callable[[str], None] | None = None,
) -> QuantReport:
    """Rewrite the fused graph in place: quantized nodes in, replaced float weights out.

    `hessians`: calibration statistics by module path (`calibrate.LayerwiseHessians`), for GPTQ;
    asked for in graph order, layer by layer. `base_dir`: the folder whose external-data file
    holds the proto's weights, if they are stored there; they are read one tensor at a time.
    `progress` is told when the quantizer reaches each decoder layer.
    """
    graph = proto.graph
    targets = _find_targets(graph, num_layers)
    inits = {t.name: t for t in graph.initializer}
    report = QuantReport(scheme)
    quantizer = _Quantizer(scheme, hessians)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # id(old node) -> replacement nodes
    dropped: set[int] = set()
    replaced: set[str] = set()

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layer = None
    for node, path, name in targets.projections:
        if progress is not None and (here := path.split(".")[2]) != layer:
            layer = here
            progress(f"layer {int(here) + 1}/{num_layers}")
        w = read_tensor(inits[node.input[1]], base_dir)  # (K, N): the exporter stores W transposed
        if scheme.kernel == INTEGER_KERNEL and path.endswith(INTEGER_TARGETS):
            # The bias stays a separate Add: ONNX Runtime's kernel adds its bias input before applying a
            # per-row activation scale, which would scale the bias too.
            new_nodes[id(node)] = _matmul_integer(graph, node, qm.quantize_per_channel(w.T, w.dtype), name, report)
        else:
            add = _bias_add(node, consumers, inits, w.shape[1])
            q = _matmul_nbits(graph, node, quantizer(path, w.T, scheme.bits), name, scheme, report,
                              bias=add.input[1] if add is not None else None)
            new_nodes[id(node)] = [q]
            if add is not None:  # the bias moves into MatMulNBits: one node less per projection
                q.output[0] = add.output[0]
                dropped.add(id(add))
        replaced.add(node.input[1])

    lm, table_name, transpose = targets.lm_head
    gather, embed_name = targets.embedding
    table = read_tensor(inits[table_name], base_dir)
    tied = transpose is not None and table_name == embed_name
    if transpose is not None:
        dropped.add(id(transpose))
    lm_weight = table if transpose is not None else table.T  # (vocab, hidden)
    lm_node = _matmul_nbits(graph, lm, quantizer("lm_head", lm_weight, scheme.bits), "lm_head.weight", scheme, report)
    new_nodes[id(lm)] = [lm_node]
    replaced.add(table_name)
    if tied and scheme.embed_bits == scheme.bits:
        report.shared_embedding = True
        new_nodes[id(gather)] = _shared_gather(graph, gather, lm_node, scheme, table.shape[1])
    else:
        emb = read_tensor(inits[embed_name], base_dir)
        bq = quantizer(None, emb, scheme.embed_bits)
        new_nodes[id(gather)] = _gather_quantized(graph, gather, bq, "model.embed_tokens.weight", scheme, report)
        replaced.add(embed_name)

    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        nodes.extend(new_nodes.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph, replaced)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    quantized = {n for t in report.tensors.values() for n in t["initializers"]}
    for t in graph.initializer:
        if t.name not in quantized:
            report.float_weights += int(np.prod(t.dims))
            report.float_bytes += _nbytes(t)
    return report


def _nbytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _add_quantized(
    graph: onnx.GraphProto, name: str, quantized: _Quantized, report: QuantReport, kind: str, *, flat: bool = False,
) -> list[str]:
    """Add the codes, scales and zero points of a quantized tensor as initializers; returns their names.

    Codes are (N, k_blocks, blob) for MatMulNBits, or (N, k_blocks * blob) when `flat` (a Gather table).
    """
    bq, algorithm, float_dtype = quantized
    bits = bq.bits
    names = [f"{name}.q{bits}", f"{name}.scales"]
    codes = qm.packed_weight(bq)
    graph.initializer.append(numpy_helper.from_array(codes.reshape(bq.N, -1) if flat else codes, names[0]))
    graph.initializer.append(numpy_helper.from_array(bq.scales.astype(float_dtype), names[1]))
    if bq.zero_points is not None:
        names.append(f"{name}.zero_points")
        graph.initializer.append(numpy_helper.from_array(qm.packed_zero_points(bq), names[2]))
    report.tensors[name] = {
        "kind": kind, "shape": [bq.N, bq.K], "bits": bits, "weights": bq.N * bq.K, "algorithm": algorithm,
        "bytes": qm.stored_bytes(bq, scale_bytes=np.dtype(float_dtype).itemsize), "initializers": names,
    }
    return names


def _bias_add(node: onnx.NodeProto, consumers: Mapping[str, list[onnx.NodeProto]],
              inits: Mapping[str, onnx.TensorProto], n: int) -> onnx.NodeProto | None:
    """The Add that is the MatMul's only reader and adds an (N,) initializer to it, if there is one."""
    readers = consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add" or readers[0].input[0] != node.output[0]:
        return None
    bias = inits.get(readers[0].input[1])
    return readers[0] if bias is not None and list(bias.dims) == [n] else None


def _matmul_nbits(
    graph: onnx.GraphProto, node: onnx.NodeProto, quantized: _Quantized, name: str,
    scheme: QuantScheme, report: QuantReport, bias: str | None = None,
) -> onnx.NodeProto:
    bq = quantized[0]
    names = _add_quantized(graph, name, quantized, report, "MatMulNBits")
    if bias is not None:  # inputs: A, B, scales, zero_points, g_idx, bias
        names = [*names, *[""] * (4 - len(names)), bias]  # a new list: the report keeps the old one
    return helper.make_node(
        "MatMulNBits", [node.input[0], *names], list(node.output), name=node.name + "_q", domain=MS_DOMAIN,
        K=bq.K, N=bq.N, bits=scheme.bits, block_size=scheme.block_size, accuracy_level=scheme.accuracy_level,
    )


def _matmul_integer(
    graph: onnx.GraphProto, node: onnx.NodeProto, cq: qm.ChannelQuantized, name: str, report: QuantReport,
) -> list[onnx.NodeProto]:
    """x @ W as MatMulIntegerToFloat: x's rows quantized to uint8 (zero point 128, scale max|row| / 127),
    W int8 (K, N) with one scale per column; 1/127 is folded into the weight scales."""
    names = [f"{name}.q8", f"{name}.scales"]
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(cq.codes.T), names[0]))  # (K, N)
    graph.initializer.append(numpy_helper.from_array((cq.scales / 127).astype(np.float32), names[1]))
    report.tensors[name] = {"kind": INTEGER_KERNEL, "shape": [cq.N, cq.K], "bits": 8, "weights": cq.N * cq.K,
                            "algorithm": "rtn", "bytes": qm.channel_stored_bytes(cq), "initializers": names}
    axes, step, zero = _shared_constants(graph)
    x, base = node.input[0], node.name + "_q"
    amax, xq = base + "/amax", base + "/codes"
    return [
        helper.make_node("Abs", [x], [base + "/abs"], name=base + "/Abs"),
        helper.make_node("ReduceMax", [base + "/abs", axes], [amax], name=base + "/ReduceMax", keepdims=1),
        helper.make_node("Div", [x, amax], [base + "/unit"], name=base + "/Div"),  # in [-1, 1]; 0/0 rows: amax 0
        helper.make_node("QuantizeLinear", [base + "/unit", step, zero], [xq], name=base + "/QuantizeLinear"),
        helper.make_node("MatMulIntegerToFloat", [xq, names[0], amax, names[1], zero], list(node.output), name=base,
                         domain=MS_DOMAIN),
    ]


_QUANT_AXES, _QUANT_STEP, _QUANT_ZERO = "quant.last_axis", "quant.step", "quant.zero_point"


def _shared_constants(graph: onnx.GraphProto) -> tuple[str, str, str]:
    """The activation quantization's constants, added once: the reduced axis, 1/127 and zero point 128."""
    if not any(t.name == _QUANT_AXES for t in graph.initializer):
        graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), _QUANT_AXES),
                                  numpy_helper.from_array(np.array(1 / 127, np.float32), _QUANT_STEP),
                                  numpy_helper.from_array(np.array(128, np.uint8), _QUANT_ZERO)])
    return _QUANT_AXES, _QUANT_STEP, _QUANT_ZERO


def _gather_quantized(
    graph: onnx.GraphProto, node: onnx.NodeProto, quantized: _Quantized, name: str,
    scheme: QuantScheme, report: QuantReport,
) -> list[onnx.NodeProto]:
    """An untied (or differently quantized) embedding: its own 2-D table for GatherBlockQuantized."""
    bq = quantized[0]
    names = _add_quantized(graph, name, quantized, report, "GatherBlockQuantized",
                           flat=True)
    return _gather_nodes(graph, node, names, scheme.embed_bits, scheme.block_size, bq.K, bq.k_blocks)


def _shared_gather(
    graph: onnx.GraphProto, node: onnx.NodeProto, lm_node: onnx.NodeProto, scheme: QuantScheme, hidden: int,
) -> list[onnx.NodeProto]:
    """Gather from the LM head's (vocab, k_blocks, blob) table through a run-time Reshape."""
    table, *params = lm_node.input[1:]
    base = node.name + "_q"
    ids = node.input[1]
    # [vocab, -1] concatenated with an empty slice of Shape(input_ids): equal to the constant, but no
    # longer foldable, so ONNX Runtime keeps one table (Reshape aliases its input, no copy).
    graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), base + ".shape_const"))
    graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), base + ".zero"))
    pre = [
        helper.make_node("Shape", [ids], [base + "/ids_shape"], name=base + "/Shape"),
        helper.make_node("Slice", [base + "/ids_shape", base + ".zero", base + ".zero"], [base + "/empty"],
                         name=base + "/Slice"),
        helper.make_node("Concat", [base + ".shape_const", base + "/empty"], [base + "/shape"], axis=0,
                         name=base + "/Concat"),
        helper.make_node("Reshape", [table, base + "/shape"], [base + "/table2d"], name=base + "/Reshape",
                         allowzero=0),
    ]
    k_blocks = -(-hidden // scheme.block_size)
    return pre + _gather_nodes(graph, node, [base + "/table2d", *params], scheme.bits, scheme.block_size,
                               hidden, k_blocks)


def _gather_nodes(
    graph: onnx.GraphProto, node: onnx.NodeProto, names: list[str], bits: int, block_size: int, hidden: int,
    k_blocks: int,
) -> list[onnx.NodeProto]:
    """GatherBlockQuantized over (vocab, padded hidden), then a Slice back to `hidden` if padded."""
    data, scales, *zp = names
    out = node.output[0]
    padded = k_blocks * block_size != hidden
    gathered = node.name + "_q/padded" if padded else out
    nodes = [helper.make_node(
        "GatherBlockQuantized", [data, node.input[1], scales, *zp], [gathered], name=node.name + "_q",
        domain=MS_DOMAIN, bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1,
    )]
    if padded:
        base = node.name + "_q/trim"
        for suffix, value in ((".starts", 0), (".ends", hidden), (".axes", -1)):
            graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), base + suffix))
        nodes.append(helper.make_node("Slice", [gathered, base + ".starts", base + ".ends", base + ".axes"],
                                      [out], name=base))
    return nodes


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the replaced float weights once no node reads them (no dead initializers)."""
    used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input}
    keep = [t for t in graph.initializer if t.name not in names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
