"""What P streams cost a decode step's projections, per stock ONNX Runtime arrangement.

    python -m benchmarks.projections [--threads 2] [--rounds 7] [--calls 20] [--rows 1,4,8]

A decode step at batch 1 multiplies P rows (one per stream) by every projection of every layer and
then one row by the LM head. Timing one node alone keeps its weights in the cache (compute-bound);
a real step streams ~360 MB of int8 weights from memory. So this builds, per arrangement, the
projections of all 24 layers of qwen2.5-0.5b (qkv 896->1152, o 896->896, gate_up 896->9728,
down 4864->896, 24 distinct weights each) chained through cheap Slices, and times the whole chain
at M rows, interleaved over rounds (medians), the 1-minute load average beside each figure.
Arrangements (each with its activation-quantization nodes, which a real graph also runs):

- `nbits8` / `nbits4`: `com.microsoft.MatMulNBits` (block 32, accuracy_level 4: int8 activations
  quantized per block inside the kernel), today's int8 / int4.
- `mitf8`: int8 weights per output channel through `com.microsoft.MatMulIntegerToFloat`, its uint8
  activations quantized per row (zero point 128) by Abs, ReduceMax, Div and QuantizeLinear.
- `dqmm8`: `com.microsoft.DynamicQuantizeMatMul`: the same weights, one activation scale per tensor.

`--lm-head` times the LM head (896 -> 151936, one row) instead, alone (its 136 MB exceed the caches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import commit
from parscale.driver import session_options
from parscale.exporter.graph.builder import MS_DOMAIN
from parscale.exporter.quant import math as qm

LAYER = (("qkv", 896, 1152), ("o", 896, 896), ("gate_up", 896, 9728), ("down", 4864, 896))
LM_HEAD = (("lm_head", 896, 151936),)


class _Graph:
    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def const(self, value: np.ndarray, name: str | None = None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op: str, *inputs: str, domain: str = "", **attrs) -> str:  # type: ignore[no-untyped-def]
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], domain=domain, **attrs))
        return out


def projection(g: _Graph, x: str, k: int, n: int, kind: str, seed: int) -> str:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
    if kind in ("nbits8", "nbits4"):
        bits = 8 if kind == "nbits8" else 4
        bq = qm.quantize_blockwise(w, bits, 32, symmetric=False)
        return g.op("MatMulNBits", x, g.const(qm.packed_weight(bq)), g.const(bq.scales),
                    g.const(qm.packed_zero_points(bq)), domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=32,
                    accuracy_level=4)
    scale = np.abs(w).max(1) / 127  # per output channel
    codes = np.round(w / scale[:, None]).astype(np.int8).T.copy()  # (K, N)
    if kind == "dqmm8":
        return g.op("DynamicQuantizeMatMul", x, g.const(codes), g.const(scale.astype(np.float32)), domain=MS_DOMAIN)
    # Per row: amax (.., 1); codes round(127 x / amax) + 128; the 1/127 folded into the weight scales.
    amax = g.op("ReduceMax", g.op("Abs", x), g.const(np.array([-1], np.int64)), keepdims=1)
    xq = g.op("QuantizeLinear", g.op("Div", x, amax), g.const(np.array(1 / 127, np.float32)),
              g.const(np.array(128, np.uint8)))
    return g.op("MatMulIntegerToFloat", xq, g.const(codes), amax, g.const((scale / 127).astype(np.float32)),
                g.const(np.array(128, np.uint8)), domain=MS_DOMAIN)


def build(kind: str, layers: int, lm_head: bool) -> bytes:
    g = _Graph()
    x = "x"
    shapes = LM_HEAD if lm_head else LAYER * layers
    for i, (_, k, n) in enumerate(shapes):
        y = projection(g, x, k, n, kind, i)
        nxt = shapes[(i + 1) % len(shapes)][1]
        x = y if lm_head else g.op("Slice", y, g.const(np.array([0], np.int64)), g.const(np.array([nxt], np.int64)),
                                   g.const(np.array([-1], np.int64)))
    k0 = shapes[0][1]
    graph = helper.make_graph(g.nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", k0])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    return model.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rows", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8])
    ap.add_argument("--kinds", default="nbits8,mitf8,dqmm8,nbits4")
    ap.add_argument("--lm-head", action="store_true")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    sessions = {k: ort.InferenceSession(build(k, args.layers, args.lm_head), session_options(args.threads),
                                        providers=["CPUExecutionProvider"]) for k in kinds}
    k0 = (LM_HEAD if args.lm_head else LAYER)[0][1]
    xs = {m: np.random.default_rng(m).standard_normal((1, m, k0)).astype(np.float32) for m in args.rows}
    times: dict[tuple[str, int], list[float]] = {(k, m): [] for k in kinds for m in args.rows}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        order = [(k, m) for k in kinds for m in args.rows]
        order = order[r % len(order):] + order[:r % len(order)]
        for k, m in order:  # interleaved: every arrangement sees the same drift in machine load
            s = sessions[k]
            s.run(None, {"x": xs[m]})
            t0 = time.perf_counter()
            for _ in range(args.calls):
                s.run(None, {"x": xs[m]})
            times[(k, m)].append((time.perf_counter() - t0) / args.calls * 1e3)
    base = statistics.median(times[(kinds[0], args.rows[0])])
    what = "LM head" if args.lm_head else f"{args.layers} layers' projections"
    print(f"commit {commit('parscale', 'benchmarks')}; "
          f"{what}, {args.threads} threads, medians of {args.rounds} rounds, load {statistics.median(loads):.2f} "
          f"(min {min(loads):.2f}, max {max(loads):.2f}); x = ratio to {kinds[0]} at M={args.rows[0]}")
    for k in kinds:
        cells = "  ".join(f"M={m}: {statistics.median(times[(k, m)]):6.2f} ms "
                          f"({statistics.median(times[(k, m)]) / base:.2f}x)" for m in args.rows)
        print(f"  {k:8s} {cells}", flush=True)


if __name__ == "__main__":
    main()
