"""Quantization policy: which tensors of an export become which ONNX Runtime nodes.

Quantized: every decoder projection (packed q/k/v, o, packed gate/up, down), the LM head and the
embedding table. The `kernel` decides the packed gate/up projection (`INTEGER_TARGETS`):

- `MatMulNBits` (the int4 default, and every other projection): block-wise weights, activations
  quantized per block of 32 inside the kernel, which re-reads each weight block for every pair of
  rows (at batch 1 the P streams are the rows);
- `MatMulIntegerToFloat` (the int8 default, CPU only): int8 weights per output channel through ONNX
  Runtime's integer GEMM, which reads each weight once for up to 6 rows, with the activations
  quantized per row by four nodes in front (Abs, ReduceMax, Div, QuantizeLinear).

The LM head and the embedding are block-wise whatever the kernel (one tied table serves both);
README "Quantization" has the measurements behind every choice.

Kept in floating point: ParScale's own parameters (prefix keys/values, the aggregation MLP), which
decide how the streams mix (0.9% of the weights of a 0.5B P=4 model, 7.7% of the small embedded
model); norms and biases.

With tied embeddings one quantized table serves both nodes: MatMulNBits reads it as
(vocab, k_blocks, blob) and the Gather reads it reshaped to (vocab, k_blocks * blob), quantized
along the hidden axis. The reshape's target shape is computed at run time on purpose: a constant
shape lets ONNX Runtime fold the Reshape at session load into a second copy of the table.

The numbers live in `quant_math`; this module only decides and rewrites the graph.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from parscale.errors import ParScaleError
from parscale.exporter import quant_math as qm
from parscale.exporter.builder import EMBED_WEIGHT, QUANT_KEY
from parscale.exporter.graphfile import read_tensor
from parscale.modeling.model import PROJECTION_INPUTS, PROJECTIONS

MS_DOMAIN = "com.microsoft"
_PROJECTION_RE = "|".join(re.escape(p) for p in PROJECTIONS)
_MATMUL_SCOPE = re.compile(r"(?:^|\.)(?:layers\.\d+\.(?:" + _PROJECTION_RE + r")|lm_head)$")
_EMBED_SCOPE = re.compile(r"(?:^|\.)embed_tokens$")
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # module path of each node, recorded by torch.onnx (dynamo)


NBITS_KERNEL, INTEGER_KERNEL = "MatMulNBits", "MatMulIntegerToFloat"
KERNELS = (NBITS_KERNEL, INTEGER_KERNEL)
# The projections the integer kernel takes: the packed gate/up (named by its first half), 69% of a layer's
# weights. q/k/v and o would add 12% more at three times the activation-quantization nodes, which cost
# more time than their weights save at P=1, and fidelity; down_proj's input, SiLU(gate) * up, has rows
# whose largest value is 10-24x their RMS on the embedded model, where one int8 scale per row loses
# most of the fidelity (README: quantization has the measurements).
INTEGER_TARGETS = (".mlp.gate_proj",)


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized. Defaults were chosen by measurement (see the README's table)."""

    bits: int  # 4 or 8: projections and LM head
    block_size: int = 32  # values per scale along the input (K / hidden) axis
    symmetric: bool = False  # True: no zero points (implicit 2**(bits-1))
    accuracy_level: int = 0  # MatMulNBits: 0 unset (float A), 1 fp32, 2 fp16, 3 bf16, 4 int8 A
    embedding_bits: int | None = None  # None: same as `bits` (needed to share a tied table)
    method: str = "rtn"  # "gptq": GPTQ on calibration statistics; "rtn": round-to-nearest
    kernel: str = "MatMulNBits"  # the projections' kernel: one of KERNELS

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise ParScaleError(f"quantization method must be gptq or rtn, got {self.method!r}")
        if self.kernel not in KERNELS:
            raise ParScaleError(f"quantization kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel != NBITS_KERNEL and (self.bits != 8 or self.method != "rtn"):
            raise ParScaleError(f"the {self.kernel} kernel takes int8 weights quantized per output channel by "
                                "round-to-nearest: use it with --int8 (and --method rtn, the int8 default)")
        if self.bits not in (4, 8):
            raise ParScaleError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.embedding_bits not in (None, 4, 8):
            raise ParScaleError(f"embedding bits must be 4 or 8, got {self.embedding_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ParScaleError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ParScaleError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    @property
    def embed_bits(self) -> int:
        return self.embedding_bits or self.bits

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["embedding_bits"] = self.embed_bits
        return d


# Per bit width, the defaults measured best on the trained embedded model (README: quantization).
DEFAULTS: dict[int, dict[str, Any]] = {
    8: {"block_size": 32, "symmetric": False, "accuracy_level": 4, "method": "rtn", "kernel": INTEGER_KERNEL},
    4: {"block_size": 32, "symmetric": False, "accuracy_level": 4, "method": "gptq", "kernel": NBITS_KERNEL},
}


def default_scheme(
    bits: int, *, block_size: int | None = None, symmetric: bool | None = None, accuracy_level: int | None = None,
    method: str | None = None, kernel: str | None = None, dtype: str = "fp32",
) -> QuantScheme:
    """The scheme for `bits` with the measured defaults, overridden where an argument is given.

    An fp16 graph (`dtype`) is for GPUs, where the integer-GEMM kernels do not run: its default
    kernel is MatMulNBits."""
    if bits not in DEFAULTS:
        raise ParScaleError(f"quantization bits must be 4 or 8, got {bits}")
    if kernel is None and dtype != "fp32":
        kernel = NBITS_KERNEL
    given = {"block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level, "method": method,
             "kernel": kernel}
    return QuantScheme(bits=bits, **{**DEFAULTS[bits], **{k: v for k, v in given.items() if v is not None}})


@dataclass
class QuantReport:
    """What was quantized: per-tensor storage, and bits per weight for those tensors and the model."""

    scheme: QuantScheme
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, bytes, kind
    shared_embedding: bool = False
    calibration: str | None = None  # where GPTQ's statistics came from
    float_weights: int = 0  # elements of the initializers left in floating point
    float_bytes: int = 0

    @property
    def quantized_weights(self) -> int:
        return sum(t["weights"] for t in self.tensors.values())

    @property
    def quantized_bytes(self) -> int:
        return sum(t["bytes"] for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits of the quantized tensors (codes, scales, zero points) per weight they replace."""
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)

    @property
    def model_bits_per_weight(self) -> float:
        """All weight bytes of the graph (quantized and float) per weight of the model."""
        return 8 * (self.quantized_bytes + self.float_bytes) / max(self.quantized_weights + self.float_weights, 1)

    def to_dict(self) -> dict[str, Any]:
        integer = self.scheme.kernel == INTEGER_KERNEL
        return {
            "method": ("int8: gate/up projections per output channel with int8 activations per row "
                       f"({INTEGER_KERNEL}), the other projections, LM head and embedding block-wise") if integer
            else f"int{self.scheme.bits} weight-only, block-wise",
            "ops": [f"{MS_DOMAIN}.{op}" for op in ([INTEGER_KERNEL] if integer else []) +
                    [NBITS_KERNEL, "GatherBlockQuantized"]],
            "scheme": self.scheme.to_dict(),
            "bits_per_weight": {"quantized": round(self.bits_per_weight, 4),
                                "model": round(self.model_bits_per_weight, 4)},
            "quantized_tensors": len(self.tensors),
            "quantized_weights": self.quantized_weights,
            "float_weights": self.float_weights,
            "shared_embedding": self.shared_embedding,
            "calibration": self.calibration,
            "kept_float": "prefix keys/values, aggregation MLP, norms, biases",
        }


def _scope(node: onnx.NodeProto) -> str | None:
    """The innermost module path torch recorded for the node, without the tracing wrapper's prefix."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            scopes = ast.literal_eval(prop.value)
            path = next((s for s in reversed(scopes) if _MATMUL_SCOPE.search(s) or _EMBED_SCOPE.search(s)), None)
            return path.removeprefix("model.") if path else None
    return None


@dataclass
class _Targets:
    projections: list[tuple[onnx.NodeProto, str, str]]  # (MatMul, calibration path, weight name), B (K, N)
    lm_head: tuple[onnx.NodeProto, str, onnx.NodeProto | None]  # (MatMul, table name, Transpose when tied)
    embedding: tuple[onnx.NodeProto, str]  # (Gather, table name)


def _find_targets(graph: onnx.GraphProto, num_layers: int) -> _Targets:
    """The nodes to quantize: named by the fused builder's metadata, else by torch.onnx's scopes."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    marked = {n.name: p.value for n in graph.node for p in n.metadata_props if p.key == QUANT_KEY}
    projections, lm_heads, embeddings = [], [], []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gather"):
            continue
        if marked:
            if node.name not in marked:
                continue
            weight, path = marked[node.name].split("|")
        elif (path := _scope(node)) is None:
            continue
        else:
            weight = path + ".weight"
        if node.op_type == "Gather" and (_EMBED_SCOPE.search(path) or weight == EMBED_WEIGHT) \
                and node.input[0] in inits:
            embeddings.append((node, node.input[0]))
        elif node.op_type == "MatMul" and path.endswith("lm_head"):
            src = producer.get(node.input[1])
            if node.input[1] in inits:
                lm_heads.append((node, node.input[1], None))
            elif src is not None and src.op_type == "Transpose" and src.input[0] in inits:
                lm_heads.append((node, src.input[0], src))  # tied: MatMul(x, Transpose(table))
        elif node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            projections.append((node, path, weight))
    expected = (len(PROJECTION_INPUTS) if marked else len(PROJECTIONS)) * num_layers  # fused: packed q/k/v, gate/up
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
    """Rewrite a traced export in place: quantized nodes in, replaced float weights out.

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
