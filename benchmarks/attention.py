"""What P streams cost a decode step's attention: GroupQueryAttention at P x heads, per arrangement.

    python -m benchmarks.attention [--threads 2] [--rounds 5] [--calls 20] [--cache 240] [--P 1,4,8]

A decode step at batch 1 runs one `com.microsoft.GroupQueryAttention` per layer with P*H query heads
and P*Hkv KV heads over the cache (our graph folds the streams into the heads). This chains the 24
layers of qwen2.5-0.5b (H 14, Hkv 2, head 64; rotary inside) over a `--cache`-row KV buffer bound as
both past and present, as our runtime binds it, and times one step at each P for each arrangement:
the cache in float32 or float16, with or without the additive attention bias (our graph masks
padding and prefix rows through it). Interleaved rounds, medians, the 1-minute load average beside.
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
from parscale.driver import CPU, session_options

H, HKV, D, LAYERS = 14, 2, 64, 24


def build(P: int, dtype: type, bias: bool, rows: int, threads: int):  # noqa: N803
    """A session of LAYERS chained GroupQueryAttention nodes, bound to one cache buffer per layer and kind."""
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    inputs = [vi("q", elem, [1, 1, P * H * D]), vi("k", elem, [1, 1, P * HKV * D]), vi("v", elem, [1, 1, P * HKV * D]),
              vi("seqlens", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, []),
              vi("bias", elem, [1, 1, 1, rows])]
    outputs, nodes, q = [], [], "q"
    for i in range(LAYERS):
        for kind in ("k", "v"):
            inputs.append(vi(f"past{i}{kind}", elem, [1, P * HKV, rows, D]))
            outputs.append(vi(f"present{i}{kind}", elem, [1, P * HKV, rows, D]))
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q, "k", "v", f"past{i}k", f"past{i}v", "seqlens", "total", "cos", "sin", "", "bias" if bias else ""],
            [f"o{i}", f"present{i}k", f"present{i}v"], domain="com.microsoft", num_heads=P * H, kv_num_heads=P * HKV,
            do_rotary=1))
        q = f"o{i}"
    tables = [numpy_helper.from_array(np.ones((rows, D // 2), dtype), "cos"),
              numpy_helper.from_array(np.zeros((rows, D // 2), dtype), "sin")]
    graph = helper.make_graph(nodes, "attention", inputs, [vi(q, elem, None), *outputs], tables)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=[CPU])
    binding = session.io_binding()
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 1, P * H * D)), "k": rng.standard_normal((1, 1, P * HKV * D)),
             "v": rng.standard_normal((1, 1, P * HKV * D)), "bias": np.zeros((1, 1, 1, rows))}
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value.astype(dtype))
    binding.bind_cpu_input("seqlens", np.array([rows - 1], np.int32))
    binding.bind_cpu_input("total", np.array(rows, np.int32))
    caches = []
    for i in range(LAYERS):
        for kind in ("k", "v"):
            cache = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, P * HKV, rows, D)).astype(dtype))
            caches.append(cache)  # kept alive: bound as both past and present
            binding.bind_ortvalue_input(f"past{i}{kind}", cache)
            binding.bind_ortvalue_output(f"present{i}{kind}", cache)
    binding.bind_output(q, "cpu")
    return session, binding, caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--cache", type=int, default=240, help="KV cache rows (prefix + tokens).")
    ap.add_argument("--P", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8])
    args = ap.parse_args()
    print(f"commit {commit('parscale', 'benchmarks')}; {LAYERS} layers of GroupQueryAttention (H {H}, Hkv {HKV}, "
          f"head {D}) at P x heads, cache {args.cache} rows, {args.threads} threads, {args.rounds} rounds of "
          f"{args.calls} calls", flush=True)
    configs = [(P, dtype, bias) for P in args.P for dtype in (np.float32, np.float16) for bias in (True, False)]
    built = {c: build(*c, args.cache, args.threads) for c in configs}
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for c in configs:
            session, binding, _ = built[c]
            session.run_with_iobinding(binding)
            t = time.perf_counter()
            for _ in range(args.calls):
                session.run_with_iobinding(binding)
            times[c].append(1000 * (time.perf_counter() - t) / args.calls)
    print(f"load avg {min(loads):.2f}-{max(loads):.2f}")
    for (P, dtype, bias), t in times.items():
        print(f"P={P} cache {np.dtype(dtype).name:8s} bias {'yes' if bias else 'no ':3s}: "
              f"{statistics.median(t):6.2f} ms per step ({LAYERS} layers)")


if __name__ == "__main__":
    main()
