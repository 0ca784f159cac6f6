"""Interleaved A/B of several exports (or settings) in one process: decode ms/token and prefill tok/s.

    python -m benchmarks.exports_ab EXPORT_A EXPORT_B[:spin] ... [--rounds 9] [--gen 32] [--threads 2] [--P N]

Every export is loaded once (`Model.load`, verification off: it is not what is timed); then each
round generates `--gen` tokens after the same 128-token random prompt with each of them, in an
order rotated each round. One process, so that no figure pays for a process start, and interleaved,
so that a drifting machine load hits every export alike: differences of a few per cent show, which
separate processes (`benchmarks.run`) do not resolve on a shared machine. `:spin` loads that
export with spinning worker threads. Medians, quartiles and the ratio to the first export's decode
time are printed with the commit and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

from benchmarks.common import commit
from parscale.runtime import Model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", help="Export folders, each optionally suffixed with :spin.")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--P", type=int, default=None, help="P to run (multi-P exports; default their largest).")
    args = ap.parse_args()
    print(f"commit {commit('parscale', 'benchmarks')}; python -m benchmarks.exports_ab {' '.join(sys.argv[1:])}",
          flush=True)
    models = {}
    for item in args.exports:
        path, _, option = item.partition(":")
        models[item] = Model.load(path, provider="cpu", threads=args.threads, verify=False, spin=option == "spin")
    ids = np.random.default_rng(0).integers(0, 1000, 128).tolist()
    for m in models.values():  # warm-up: first-call allocations and page faults are not decode speed
        m.generate(prompt_ids=ids, max_new_tokens=4, ignore_eos=True, P=args.P)
    decode: dict[str, list[float]] = {item: [] for item in models}
    prefill: dict[str, list[float]] = {item: [] for item in models}
    loads = []
    for rnd in range(args.rounds):
        shift = rnd % len(args.exports)
        loads.append(os.getloadavg()[0])
        for item in args.exports[shift:] + args.exports[:shift]:
            t = models[item].generate(prompt_ids=ids, max_new_tokens=args.gen, ignore_eos=True, P=args.P).timings
            decode[item].append(t.decode_ms_per_token)
            prefill[item].append(t.prefill_tokens_per_s)
    print(f"{args.rounds} rounds, {args.gen} new tokens after 128, {args.threads} threads, "
          f"load avg {min(loads):.2f}-{max(loads):.2f}")
    base = statistics.median(decode[args.exports[0]])
    for item in args.exports:
        d = decode[item]
        q1, q3 = np.percentile(d, [25, 75])
        print(f"{item}: decode {statistics.median(d):.2f} ms/token (x{statistics.median(d) / base:.3f}, "
              f"quartiles {q1:.1f}-{q3:.1f}), prefill {statistics.median(prefill[item]):.0f} tok/s")


if __name__ == "__main__":
    main()
