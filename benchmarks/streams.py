"""Several P over one backbone at a real size: memory of serving every P, and the speed of each P.

    python -m benchmarks.streams --work DIR [--size 0.5b] [--kind int8] [--rounds 3] [--threads 2]

Makes (once, cached in --work, through benchmarks.export_memory so the export's own time and peak
memory are recorded too) a random checkpoint of the size at P=8 with head sets for P=2 and 4, its
multi-P export (P = 1, 2, 4, 8, the default command with validation on) and the single-P exports of
P=1 and P=8 of the same checkpoint. Then, over interleaved rounds, each in a fresh process at the
same thread count:

- memory: VmHWM (peak resident memory) of loading the single P=8 export and generating at P=8,
  against loading the multi-P export and generating at every P in turn (the issue's bound: at most
  1.10x), and at P=8 only;
- speed: decode ms/token and prefill tokens/s of each P of the multi-P export (`bench_streams`, one
  process), beside the single-P exports of P=1 and P=8.

Medians over the rounds; the 1-minute load average is printed beside each figure. Writes
benchmarks/results/streams.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.export_memory import run_case

RESULTS = Path(__file__).resolve().parent / "results"
STREAMS = [1, 2, 4, 8]
PROMPT, NEW = 128, 64

# A child process: load an export, generate at the given P in turn, print VmHWM and VmRSS (MB).
MEMORY_CHILD = """
import json, sys
from benchmarks.common import prompt_ids
from parscale.runtime import Model
from parscale.runtime.bench import peak_rss_mb
folder, threads, Ps = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]
m = Model.load(folder, threads=threads, verify=False)
ids = prompt_ids(m.vocab_size, PROMPT_LEN)
for P in Ps:
    m.generate(prompt_ids=ids, max_new_tokens=NEW_TOKENS, ignore_eos=True, P=P if len(m.streams) > 1 else None)
rss = [int(l.split()[1]) / 1e3 for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
print(json.dumps({"peak_mb": peak_rss_mb(), "rss_mb": rss}))
""".replace("PROMPT_LEN", str(PROMPT)).replace("NEW_TOKENS", str(NEW))


def _child(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"child failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _bench(folder: Path, streams: list[int] | None, threads: int) -> list[dict]:
    cmd = [sys.executable, "-m", "parscale", "bench", str(folder), "--threads", str(threads), "--prompt-len",
           str(PROMPT), "--gen", str(NEW), "--json", "--no-verify"]
    if streams:
        cmd += ["--P", ",".join(map(str, streams))]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"bench failed: {r.stderr.strip()[-2000:]}")
    data = json.loads(r.stdout)
    return data if isinstance(data, list) else [data]


def make_exports(work: Path, size: str, kind: str) -> tuple[dict[str, Path], list[dict]]:
    """The multi-P export and the single-P exports of P=1 and P=8 of one checkpoint (cached)."""
    records = []
    multi_case = f"{size}-p{','.join(map(str, STREAMS))}:{kind}"
    folders = {"multi": work / f"out-{size}-p{'-'.join(map(str, STREAMS))}-{kind}",
               "p8": work / f"out-{size}-p8-{kind}"}
    for name, case in (("multi", multi_case), ("p8", f"{size}-p8:{kind}")):
        if not (folders[name] / "parscale.json").is_file():
            records.append(run_case(case, work))
    folders["p1"] = work / f"out-{size}-p1-of-p8-{kind}"
    if not (folders["p1"] / "parscale.json").is_file():  # P=1 of the same backbone: the head-set path
        subprocess.run([sys.executable, "-m", "parscale", "export", str(work / f"ckpt-{size}-p8"), "--P", "1",
                        f"--{kind}", "-o", str(folders["p1"]), "--force"], check=True)
    return folders, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-streams"))
    ap.add_argument("--size", default="0.5b", choices=["0.5b", "1.5b", "3b"])
    ap.add_argument("--kind", default="int8", choices=["int8", "int4"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders, exports = make_exports(args.work, args.size, args.kind)
    memory: dict[str, list[dict]] = {"single P=8": [], "multi, P=8 only": [], "multi, every P": []}
    speed: dict[str, list[dict]] = {}
    t = str(args.threads)
    for k in range(args.rounds):
        cases = [("single P=8", folders["p8"], "8"), ("multi, P=8 only", folders["multi"], "8"),
                 ("multi, every P", folders["multi"], ",".join(map(str, STREAMS)))]
        for name, folder, ps in cases[k % 3:] + cases[:k % 3]:  # a different order each round
            load = os.getloadavg()[0]
            memory[name].append(_child(MEMORY_CHILD, str(folder), t, ps) | {"load": load})
            print(f"round {k + 1} memory {name}: {memory[name][-1]}", flush=True)
        for name, folder, ps in (("multi", folders["multi"], STREAMS), ("single P=1", folders["p1"], None),
                                 ("single P=8", folders["p8"], None)):
            load = os.getloadavg()[0]
            for r in _bench(folder, ps, args.threads):
                speed.setdefault(f"{name} P={r['P']}" if name == "multi" else name, []).append(r | {"load": load})
            print(f"round {k + 1} speed {name} done (load {load:.2f})", flush=True)
    result = {"size": args.size, "kind": args.kind, "threads": args.threads, "rounds": args.rounds,
              "prompt": PROMPT, "new_tokens": NEW, "exports": exports, "memory": memory, "speed": speed,
              "files_mb": {n: sum(p.stat().st_size for p in f.iterdir()) / 1e6 for n, f in folders.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streams.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "streams.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    med = statistics.median
    rows = [f"Several P over one backbone: qwen2.5-{r['size']} (random weights), {r['kind']}, "
            f"{r['threads']} threads, prompt {r['prompt']}, {r['new_tokens']} new tokens, median of {r['rounds']} "
            "interleaved rounds, each in a fresh process.", "",
            "Files: " + ", ".join(f"{n} {mb:,.0f} MB" for n, mb in r["files_mb"].items()), "",
            "| process | peak RSS (VmHWM) | RSS at the end | x single P=8 | load avg (1 min) |",
            "|---|---:|---:|---:|---|"]
    base = med(x["peak_mb"] for x in r["memory"]["single P=8"])
    for name, runs in r["memory"].items():
        peak = med(x["peak_mb"] for x in runs)
        rows.append(f"| {name} | {peak:,.0f} MB | {med(x['rss_mb'] for x in runs):,.0f} MB | {peak / base:.3f} "
                    f"| {_loads(runs)} |")
    rows += ["", "| export, P | decode ms/token | prefill tok/s | load avg (1 min) |", "|---|---:|---:|---|"]
    for name, runs in r["speed"].items():
        rows.append(f"| {name} | {med(x['decode_ms_per_token'] for x in runs):.2f} "
                    f"| {med(x['prefill_tokens_per_s'] for x in runs):.1f} | {_loads(runs)} |")
    return "\n".join(rows) + "\n"


def _loads(runs: list[dict]) -> str:
    return ", ".join(f"{x['load']:.2f}" for x in runs)


if __name__ == "__main__":
    main()
