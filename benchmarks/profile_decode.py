"""Where a decode step spends its time: ORT profiling of one export, kernel time per op type.

    python -m benchmarks.profile_decode EXPORT [--threads 2] [--prompt-len 128] [--steps 16]
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np
import onnxruntime as ort

from benchmarks.common import commit
from parscale.driver import CPU, session_options
from parscale.manifest import MODEL_FILE
from parscale.runtime.api import Model
from parscale.runtime.batch import run_generation
from parscale.runtime.engine import Engine
from parscale.runtime.sampling import SamplingConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    m = Model.load(args.export, provider="cpu", threads=args.threads)
    opts = session_options(args.threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = "/tmp/parscale-profile"
    session = ort.InferenceSession(f"{args.export}/{MODEL_FILE}", opts, providers=[CPU])
    ids = [np.random.default_rng(0).integers(0, m.vocab_size, args.prompt_len).tolist()]
    steps = run_generation(Engine(session, m.info, CPU), ids, max_new_tokens=args.steps + 1,
                           sampling=SamplingConfig(), eos_ids=[], stop=[],
                           tokenizer=None, ignore_eos=True)
    *_, last = steps
    assert last.results is not None
    timings = last.results[0].timings
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    per_op: collections.Counter[str] = collections.Counter()
    nodes = 0
    for e in events:  # decode runs only: everything after the prefill run started
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[1]["ts"]:
            per_op[e["args"].get("op_name")] += e["dur"]
            nodes += 1
    steps = len(runs) - 1
    total = sum(per_op.values()) / steps / 1000
    run = sum(e["dur"] for e in runs[1:]) / steps / 1000
    print(f"commit {commit('parscale', 'benchmarks')}; load avg {os.getloadavg()[0]:.2f}")
    print(f"{args.export}: decode {timings.decode_ms_per_token:.1f} ms/token; per step: run {run:.1f} ms, "
          f"kernels {total:.1f} ms, {nodes // steps} nodes")
    for op, us in per_op.most_common(15):
        print(f"  {op:32s} {us / steps / 1000:8.2f} ms")


if __name__ == "__main__":
    main()
