"""What P streams cost one quantized projection: ONNX Runtime's MatMulNBits with M = 1, 2, 4, 8 rows.

    python -m benchmarks.matmul_rows [--threads 2] [--rounds 7] [--calls 200]

At batch 1 a decode step multiplies P rows (one per stream) by every weight matrix. This times one
`com.microsoft.MatMulNBits` node alone (accuracy_level 4, block 32, the exporter's defaults) on the
qwen2.5-0.5b shapes, int8 and int4, for each M, interleaved over rounds (median of the rounds), the
1-minute load average beside each figure. If M rows cost M-independent time the kernel is
bandwidth-bound and P streams are nearly free; the ratio to M=1 is what they cost instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from parscale.driver import session_options
from parscale.exporter.quant import math as qm

SHAPES = {"qkv (896 -> 1152)": (896, 1152), "gate_up (896 -> 9728)": (896, 9728), "down (4864 -> 896)": (4864, 896)}


def session(k: int, n: int, bits: int, threads: int, level: int = 4) -> ort.InferenceSession:
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.02
    bq = qm.quantize_blockwise(w, bits, 32, symmetric=False)
    inits = [numpy_helper.from_array(qm.packed_weight(bq), "B"), numpy_helper.from_array(bq.scales, "scales"),
             numpy_helper.from_array(qm.packed_zero_points(bq), "zp")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=32, accuracy_level=level)
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--accuracy-levels", type=lambda v: [int(x) for x in v.split(",")], default=[4],
                    help="MatMulNBits accuracy_level(s): 4 = int8 activations (the exporter's default), 1 = fp32")
    args = ap.parse_args()
    rows = (1, 2, 4, 8)
    for bits, level, (label, (k, n)) in ((b, lv, sh) for b in (8, 4) for lv in args.accuracy_levels
                                          for sh in SHAPES.items()):
        s = session(k, n, bits, args.threads, level)
        xs = {m: np.random.default_rng(m).standard_normal((m, k)).astype(np.float32) for m in rows}
        times: dict[int, list[float]] = {m: [] for m in rows}
        loads = []
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for m in rows:  # interleaved: every M sees the same drift in machine load
                s.run(None, {"A": xs[m]})
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    s.run(None, {"A": xs[m]})
                times[m].append((time.perf_counter() - t0) / args.calls * 1e6)
        med = {m: statistics.median(v) for m, v in times.items()}
        cells = "  ".join(f"M={m}: {med[m]:7.1f} us ({med[m] / med[1]:.2f}x)" for m in rows)
        print(f"int{bits} level {level} {label:22s} {cells}  load {statistics.median(loads):.2f}", flush=True)


if __name__ == "__main__":
    main()
