"""Interleaved A/B of ONNX Runtime session options on one export, in one process.

    python -m benchmarks.session_ab EXPORT default session.intra_op.allow_spinning=1 arena=1 opt=basic

Each variant is a comma-separated list: `arena=0|1`, `opt=basic|ext|all`, or a session config entry
`key=value`, applied on top of parscale's own options. Runs are interleaved so that a drifting
machine load hits every variant alike; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

from parscale.graph import CPU, session_options
from parscale.manifest import MODEL_FILE
from parscale.runtime.model import Model
from parscale.runtime.session import Engine

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "ext": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def options(variant: str, threads: int) -> ort.SessionOptions:
    opts = session_options(threads)
    for item in filter(None, variant.split(",")):
        if item == "default":
            continue
        key, value = item.split("=", 1)
        if key == "arena":
            opts.enable_cpu_mem_arena = value == "1"
        elif key == "opt":
            opts.graph_optimization_level = LEVELS[value]
        else:
            opts.add_session_config_entry(key, value)
    return opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    info = Model.load(args.export, provider="cpu").info
    sessions = {v: ort.InferenceSession(f"{args.export}/{MODEL_FILE}", options(v, args.threads), providers=[CPU])
                for v in args.variants}
    ids = np.random.default_rng(0).integers(0, info.vocab_size, (1, 128))
    mask = np.ones((1, 128 + args.steps + 1), dtype=np.int64)
    decode: dict[str, list[float]] = {v: [] for v in sessions}
    prefill: dict[str, list[float]] = {v: [] for v in sessions}
    for _ in range(args.reps):
        for v, s in sessions.items():
            engine = Engine(s, info, CPU)
            engine.reset(1)
            t = time.perf_counter()
            logits = engine.step(ids, mask[:, :128], np.arange(128)[None])
            prefill[v].append(time.perf_counter() - t)
            steps = []
            for i in range(args.steps):
                token = np.array([[int(logits[0].argmax())]])
                t = time.perf_counter()
                logits = engine.step(token, mask[:, :129 + i], np.array([[128 + i]]))
                steps.append(time.perf_counter() - t)
            decode[v].append(1000 * statistics.median(steps))
    for v in sessions:
        print(f"{v:48s} decode {statistics.median(decode[v]):7.1f} ms/token {[round(x) for x in decode[v]]}  "
              f"prefill {statistics.median(prefill[v]):6.2f} s")


if __name__ == "__main__":
    main()
