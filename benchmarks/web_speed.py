"""Decode speed in the browser (headless Chromium, WASM) beside Node's and our runtime's, on one export.

    python -m benchmarks.web_speed --work DIR [--threads 2] [--prompt-len 32] [--gen 64] [--rounds 3]
                                  [--P 1,4] [--results benchmarks/results]

Makes (once, cached in --work, without validation) exports of the embedded default model: the
multi-P one of `make demo` (`--P 1,2,4,8 --int8`) and single-P ones at P=4, int8 and fp32, which
transformers.js can run (it cannot size a multi-P export's cache). Then, over interleaved rounds, each run a fresh
process (a fresh browser for the page) pinned to --threads:

- chromium: the page (web/, onnxruntime-web WASM) served by `parscale web`'s server, in Debian's
  headless chromium driven by Playwright; `window.parscale.generate` at each --P of the multi-P
  export and at P=4 of the single ones (one warm-up call first; EOS ignored);
- node: transformers.js on onnxruntime-node (web/bench.mjs) on the single-P exports;
- runtime: `parscale bench --json` (parscale.runtime on onnxruntime) on every export.

Decode ms/token is one graph run after prefill, averaged over the --gen tokens of a call; medians
over the rounds, with the 1-minute load average beside each figure. Writes
RESULTS/web_speed.{json,md}. Needs `make web` and `make browser` (chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import commit, prompt_ids

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = ROOT / "parscale" / "assets" / "default"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_exports(work: Path) -> dict[str, Path]:
    """The embedded model's int8 multi-P export and its single P=4 exports, int8 and fp32 (made once)."""
    from parscale.exporter.pipeline import export
    from parscale.exporter.quant.policy import default_scheme

    made = {}
    for name, P, quantize in (("multi-int8", [1, 2, 4, 8], default_scheme(8)), ("p4-int8", 4, default_scheme(8)),
                              ("p4-fp32", 4, None)):
        out = work / f"default-{name}"
        if not (out / "parscale.json").is_file():
            export(DEFAULT_MODEL, out, P=P, quantize=quantize, validate=False, force=True)
        made[name] = out
    return made


def chromium_run(folder: Path, streams: list[int], ids: list[int], gen: int, threads: int) -> list[dict]:
    """One fresh headless chromium: load the page on `folder`, time `generate` at each P."""
    from playwright.sync_api import sync_playwright

    from parscale.browser import web_server

    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        with web_server(folder, port=0).start() as server, sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = ctx.new_page()
            page.goto(f"{server.url}?autoload=0")
            loaded = page.evaluate("async (t) => await window.parscale.load('model/', {backend: 'wasm', threads: t})",
                                   threads)
            rows = []
            for P in streams:
                call = {"promptIds": ids, "maxNewTokens": gen, "P": P, "ignoreEos": True}
                page.evaluate("async (c) => await window.parscale.generate({...c, maxNewTokens: 4})", call)  # warm-up
                r = page.evaluate("async (c) => await window.parscale.generate(c)", call)
                rows.append({"system": "chromium (onnxruntime-web WASM)", "P": P, "threads": loaded["threads"],
                             "decode_ms_per_token": r["msPerToken"], "prefill_ms": r["prefillMs"]})
            ctx.close()
            return rows
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def node_run(folder: Path, ids: list[int], gen: int, threads: int) -> dict:
    cmd = ["node", str(ROOT / "web" / "bench.mjs"), str(folder), json.dumps(ids), str(gen), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "web", timeout=1800)
    if done.returncode:
        raise SystemExit(f"node failed: {done.stderr.strip()[-2000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"system": f"node (transformers.js {r['transformers_js']}, onnxruntime-node)", "P": 4,
            "decode_ms_per_token": r["decode_ms_per_token"], "prefill_ms": r["prefill_ms"], "threads": threads}


def runtime_run(folder: Path, streams: list[int] | None, prompt_len: int, gen: int, threads: int) -> list[dict]:
    cmd = [sys.executable, "-m", "parscale", "bench", str(folder), "--prompt-len", str(prompt_len), "--gen", str(gen),
           "--threads", str(threads), "--json", "--no-verify"]
    if streams:
        cmd += ["--P", ",".join(map(str, streams))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"parscale bench failed: {done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return [{"system": "parscale.runtime (onnxruntime)", "P": r["P"], "decode_ms_per_token": r["decode_ms_per_token"],
             "prefill_ms": 1000 * prompt_len / r["prefill_tokens_per_s"], "threads": threads}
            for r in (out if isinstance(out, list) else [out])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the exports (kept between runs).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--P", default="1,4", help="P of the multi-P export to time in the browser and the runtime.")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.commit = commit("parscale", "benchmarks", "web")  # at start: the code every figure below ran on
    args.command = "python -m benchmarks.web_speed " + " ".join(sys.argv[1:] if argv is None else argv)
    streams = [int(p) for p in args.P.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    exports = make_exports(args.work)
    ids = prompt_ids(4096, args.prompt_len)  # the embedded model's vocabulary
    runs: list[dict] = []
    for round_ in range(args.rounds):
        jobs = [("multi-int8", lambda: chromium_run(exports["multi-int8"], streams, ids, args.gen, args.threads)),
                ("multi-int8", lambda: runtime_run(exports["multi-int8"], streams, args.prompt_len, args.gen,
                                                   args.threads))]
        for name in ("p4-int8", "p4-fp32"):
            jobs += [(name, lambda f=exports[name]: chromium_run(f, [4], ids, args.gen, args.threads)),
                     (name, lambda f=exports[name]: [node_run(f, ids, args.gen, args.threads)]),
                     (name, lambda f=exports[name]: runtime_run(f, None, args.prompt_len, args.gen, args.threads))]
        shift = round_ % len(jobs)  # rotate the order: drifting load hits every system alike
        for export_name, job in jobs[shift:] + jobs[:shift]:
            load = os.getloadavg()[0]
            for row in job():
                runs.append({**row, "export": export_name, "round": round_, "load_1min": load})
                print(json.dumps(runs[-1]), flush=True)
    table = summarize(runs)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "web_speed.json").write_text(json.dumps({"settings": vars(args) | {"work": str(args.work),
                                                             "results": str(args.results)}, "runs": runs,
                                                             "median": table}, indent=2) + "\n")
    (args.results / "web_speed.md").write_text(markdown(table, args))
    print(markdown(table, args))


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["system"], r["export"], r["P"]), []).append(r)
    return [{"system": s, "export": e, "P": P,
             "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in rs),
             "prefill_ms": statistics.median(r["prefill_ms"] for r in rs if r["prefill_ms"] is not None)
             if any(r["prefill_ms"] is not None for r in rs) else None,
             "load_1min": statistics.median(r["load_1min"] for r in rs), "rounds": len(rs)}
            for (s, e, P), rs in groups.items()]


def markdown(table: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# Decode speed: browser, Node, runtime (embedded model, {args.threads} threads, prompt "
             f"{args.prompt_len}, {args.gen} new tokens, medians of {args.rounds} rounds)", "",
             f"Command: `{args.command}` at commit `{args.commit}`.", "",
             "| system | export | P | decode ms/token | prefill ms | load (1 min) |", "|---|---|---|---|---|---|"]
    for r in sorted(table, key=lambda r: (r["export"], r["P"], r["system"])):
        prefill = f"{r['prefill_ms']:.1f}" if r["prefill_ms"] is not None else "-"
        lines.append(f"| {r['system']} | {r['export']} | {r['P']} | {r['decode_ms_per_token']:.2f} | {prefill} | "
                     f"{r['load_1min']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
