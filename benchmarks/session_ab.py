"""Interleaved A/B of ONNX Runtime session options on one export, in one process.

    python -m benchmarks.session_ab EXPORT spin=0 spin=1 [arena=1] [opt=basic] [--busy 1] [--out FILE]

Each variant is a comma-separated list: `default`, `spin=0|1` (idle workers sleep or spin),
`arena=0|1`, `opt=basic|ext|all`, or a session config entry `key=value`, applied on top of
parscale's own options. Runs are interleaved so that a drifting machine load hits every variant
alike; medians are printed with the 1-minute load average. `--busy N` keeps N other processes busy
(a pure-Python loop each) for the whole run: a machine where something else wants the cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.common import commit
from parscale.driver import CPU, session_options
from parscale.manifest import MODEL_FILE
from parscale.runtime.api import Model
from parscale.runtime.engine import Engine

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "ext": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def options(variant: str, threads: int) -> ort.SessionOptions:
    items = [i.split("=", 1) for i in variant.split(",") if i and i != "default"]
    spin = {k: v for k, v in items}.get("spin")
    opts = session_options(threads, spin=None if spin is None else spin == "1")
    for key, value in items:
        if key == "spin":
            continue
        if key == "arena":
            opts.enable_cpu_mem_arena = value == "1"
        elif key == "opt":
            opts.graph_optimization_level = LEVELS[value]
        else:
            opts.add_session_config_entry(key, value)
    return opts


def busy() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--busy", type=int, default=0, help="Other processes kept busy meanwhile.")
    ap.add_argument("--out", type=Path, help="Also write the lines printed to this file.")
    args = ap.parse_args()
    head = [f"commit {commit('parscale', 'benchmarks')}; python -m benchmarks.session_ab {' '.join(sys.argv[1:])}"]
    print(head[0], flush=True)
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.busy)]
    for h in hogs:
        h.start()
    try:
        lines = head + run(args)
    finally:
        for h in hogs:
            h.terminate()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> list[str]:
    info = Model.load(args.export, provider="cpu").info
    sessions = {v: ort.InferenceSession(f"{args.export}/{MODEL_FILE}", options(v, args.threads), providers=[CPU])
                for v in args.variants}
    ids = np.random.default_rng(0).integers(0, info.vocab_size, (1, 128))
    mask = np.ones((1, 128 + args.steps + 1), dtype=np.int64)
    decode: dict[str, list[float]] = {v: [] for v in sessions}
    prefill: dict[str, list[float]] = {v: [] for v in sessions}
    loads: list[float] = []
    for _ in range(args.reps):
        for v, s in sessions.items():
            loads.append(os.getloadavg()[0])
            engine = Engine(s, info, CPU)
            engine.reset(1, 128 + args.steps + 1)
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
    lines = [f"{args.export}: {args.reps} interleaved runs of each, prompt 128, {args.steps} decode steps, "
             f"{args.threads} threads, {args.busy} busy processes beside; load avg {min(loads):.2f}-{max(loads):.2f}"]
    for v in sessions:
        lines.append(f"{v:24s} decode {statistics.median(decode[v]):7.1f} ms/token "
                     f"{[round(x, 1) for x in decode[v]]}  prefill {statistics.median(prefill[v]):6.2f} s")
    print("\n".join(lines), flush=True)
    return lines


if __name__ == "__main__":
    main()
