"""Does ONNX Runtime share an export's weights between two sessions in one process?

    python -m benchmarks.session_share EXPORT [--threads 2]

Why it matters: serving several P from sessions of their own would only save memory if the sessions
shared the weights, prepacked MatMulNBits weights included. Each mode runs in a fresh process, which
opens the export's graph and runs one prefill step per session, then prints its resident memory
(VmRSS, and VmHWM):

- one: one session;
- two: two sessions, each reading the weights from the files;
- two-shared: two sessions whose options both hold every external weight as the same OrtValue
  (`SessionOptions.add_initializer`), the Python API's way of sharing initializers.

If two-shared costs about what one does, the sessions share everything; if it costs about what
two does, they do not (ONNX Runtime prepacks per session unless a prepacked-weights container is
given, which its Python API does not expose).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from parscale.driver import GraphInfo, session_options, step
from parscale.manifest import MODEL_FILE
from parscale.runtime.bench import peak_rss_mb

folder, mode, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
path = f"{folder}/{MODEL_FILE}"
keep = []
options = [session_options(threads) for _ in range(1 if mode == "one" else 2)]
if mode == "two-shared":
    proto = onnx.load(path, load_external_data=True)
    external = onnx.load(path, load_external_data=False)
    names = {t.name for t in external.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for t in proto.graph.initializer:
        if t.name in names:
            array = np.ascontiguousarray(numpy_helper.to_array(t))
            value = ort.OrtValue.ortvalue_from_numpy(array)
            keep.append((array, value))
            for o in options:
                o.add_initializer(t.name, value)
    del proto
sessions = [ort.InferenceSession(path, o, providers=["CPUExecutionProvider"]) for o in options]
ids = np.arange(1, 33, dtype=np.int64)[None]
for s in sessions:
    step(s, GraphInfo.of(s), ids, np.ones_like(ids), np.arange(32, dtype=np.int64)[None])
rss = [int(l.split()[1]) / 1e3 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
print(json.dumps({"mode": mode, "sessions": len(sessions), "shared": len(keep), "rss_mb": rss,
                  "peak_mb": peak_rss_mb()}))
"""

MODES = ("one", "two", "two-shared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            r = subprocess.run([sys.executable, "-c", CHILD, str(args.export), mode, str(args.threads)],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            results[mode].append(json.loads(r.stdout.strip().splitlines()[-1]) | {"load": os.getloadavg()[0]})
            print(json.dumps(results[mode][-1]), flush=True)
    files = sum(p.stat().st_size for p in args.export.iterdir()) / 1e6
    one = min(x["rss_mb"] for x in results["one"])
    print(f"\n{args.export} ({files:,.0f} MB of files), {args.threads} threads; RSS after one prefill per session "
          f"(lowest of {args.rounds} rounds):")
    for mode in MODES:
        rss = min(x["rss_mb"] for x in results[mode])
        print(f"  {mode:11s} {rss:8,.0f} MB   {rss / one:5.2f}x one session   load {results[mode][-1]['load']:.2f}")


if __name__ == "__main__":
    main()
