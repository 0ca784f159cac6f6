"""Post-trace graph rewrites that keep the graph plain ONNX but let ONNX Runtime fuse more at load.

Only exact rewrites (the same math, at most rounding in the last bit) that any ONNX runtime runs.
Applied by `trace.finish_graph` to every export.
"""

from __future__ import annotations

from collections import defaultdict

import onnx


def optimize_graph(proto: onnx.ModelProto) -> dict[str, int]:
    """Rewrite `proto` in place; returns how many times each rewrite applied."""
    return {"rmsnorm_div": rmsnorm_as_div(proto.graph)}


def rmsnorm_as_div(graph: onnx.GraphProto) -> int:
    """`x * Reciprocal(Sqrt(v))` -> `x / Sqrt(v)`.

    torch.rsqrt traces to Sqrt + Reciprocal + Mul; ONNX Runtime's SimplifiedLayerNormalization
    fusion looks for Pow, ReduceMean, Add, Sqrt, Div (then Mul by the weight). With Div each RMSNorm
    runs as one fused kernel instead of seven nodes (49 norms in a 24-layer model).
    """
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    done = 0
    for rec in [n for n in graph.node if n.op_type == "Reciprocal"]:
        sqrt = producer.get(rec.input[0])
        users = consumers[rec.output[0]]
        if sqrt is None or sqrt.op_type != "Sqrt" or len(users) != 1 or rec.output[0] in graph_outputs:
            continue
        mul = users[0]
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or list(mul.input).count(rec.output[0]) != 1:
            continue
        x = mul.input[1] if mul.input[0] == rec.output[0] else mul.input[0]
        mul.op_type = "Div"
        del mul.input[:]
        mul.input.extend([x, sqrt.output[0]])
        graph.node.remove(rec)
        done += 1
    return done
