"""Throughput of `parscale serve` with 1, 4 and 16 concurrent clients at P=1 and P=4, and the latency of
a request that joins a running batch.

    python -m benchmarks.serve [--work DIR] [--preset qwen2.5-0.5b] [--kind int8] [--P 1,4] [--clients 1,4,16]
                               [--requests 4] [--prompt-len 128] [--gen 64] [--threads 2] [--max-batch 16]
                               [--rounds 3] [--bound-gen 64,256] [--name serve]

Makes (once, cached in --work; for the 0.5b/1.5b/3b presets through benchmarks.export_memory, which
records the export's time and memory) a random checkpoint of the preset at the largest P, with random
head sets for the others, and one multi-P export serving every P (`--preset tiny`: a tiny one, for a
smoke run). Starts `parscale serve` on it (loopback, --threads, --max-batch) and, for each round, P and
client count, has every client send --requests streaming completions one after the other, each a
different random prompt of --prompt-len ids and --gen new tokens (greedy, EOS ignored). Measured:
completion tokens per second over the case (first request sent to last token received), time to first
token of each request (p50, p95), the server's peak RSS (VmHWM, reset before each case), the
scheduler's rows per decode step, and the 1-minute load average before and after.

Join latency, per P: one client streams; once it has 8 tokens a second request is sent. Its time to
first token (it joins the running batch at the next step: a prefill left-padded to the batch's
length) against the same request on an idle server, and the longest gap between two tokens of the
first stream meanwhile (what the join's prefill cost it).

The scheduler's bound, after the server has stopped: the same clients at P=1 (1 and 4 of them, each
--requests completions of every --bound-gen length) send their requests straight to the server's
scheduler (`parscale.serve.batcher.Batcher`) in this process, with no HTTP, JSON or second process
between: what the server could reach with free transport, interleaved rounds.

Every response is checked after the timings, with the server stopped: its tokens must be the model's
greedy continuation of its prompt, each within the tolerance `parscale.serve.verify.check_greedy`
measures for that sequence (twice the change left padding makes to its logits, at least 0.05),
and those identical to the 1-client answer of the same prompt are counted. Medians over the rounds.
Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.common import commit, prompt_ids
from benchmarks.export_memory import PRESETS, run_case
from benchmarks.report import machine

RESULTS = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "parscale"]
JOIN_AFTER = 8  # tokens the first stream has when the joining request is sent
TARGET = 2.5  # 4 clients' tokens/s over 1 client's, at P=1


def prepare(work: Path, preset: str, kind: str, streams: list[int]) -> tuple[Path, list[dict]]:
    """The multi-P export (made once); the export_memory records of what was made now."""
    from parscale.modeling.heads import head_sets
    from parscale.modeling.random_init import init_heads

    work.mkdir(parents=True, exist_ok=True)
    if preset != "tiny":
        size = {v: k for k, v in PRESETS.items()}[preset]
        out = work / f"out-{size}-p{'-'.join(map(str, streams))}-{kind}"
        made = [] if (out / "parscale.json").is_file() else [run_case(f"{size}-p{','.join(map(str, streams))}:{kind}",
                                                                       work)]
        return out, made
    ckpt, out = work / f"ckpt-tiny-p{max(streams)}", work / f"out-tiny-p{'-'.join(map(str, streams))}-{kind}"
    if not (out / "parscale.json").is_file():
        if not (ckpt / "config.json").is_file():
            subprocess.run([*CLI, "init", str(ckpt), "--preset", "tiny", "--P", str(max(streams)), "--force"],
                           check=True)
        init_heads(ckpt, [p for p in streams if p not in head_sets(ckpt)])
        subprocess.run([*CLI, "export", str(ckpt), "-o", str(out), "--P", ",".join(map(str, streams)), f"--{kind}",
                        "--force"], check=True)
    return out, []


class Server:
    """`parscale serve EXPORT` on a free loopback port, in a child process."""

    def __init__(self, export: Path, threads: int, max_batch: int, max_queue: int) -> None:
        self.command = [*CLI, "serve", str(export), "--port", "0", "--threads", str(threads), "--max-batch",
                        str(max_batch), "--max-queue", str(max_queue), "--no-verify", "--name", "bench"]
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 600)
        line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        found = re.search(r" on (http://\S+)/v1 ", line)
        if found is None:
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line!r}")
        parts = urlsplit(found.group(1))
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def health(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request("GET", "/health")
        data = json.loads(conn.getresponse().read())
        conn.close()
        return data

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
        return -1.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def complete(server: Server, P: int, prompt: list[int], gen: int,  # noqa: N803
             on_token: Any = None) -> dict[str, Any]:
    """One streamed greedy completion: its tokens, the time to the first, every token's arrival time."""
    body = {"model": f"bench:p{P}", "prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=3600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"the server answered {resp.status}: {resp.read()[:500]!r}")
    tokens: list[int] = []
    times: list[float] = []
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise SystemExit(f"the server failed a request: {chunk['error']}")
        ids = chunk["choices"][0].get("token_ids") or []
        tokens += ids
        times += [time.perf_counter()] * len(ids)
        if ids and on_token is not None:
            on_token(len(tokens))
    conn.close()
    return {"sent": sent, "ttft_s": times[0] - sent, "end": times[-1], "tokens": tokens, "times": times}


def measure(server: Server, P: int, clients: int, requests: int, prompts: list[list[int]],  # noqa: N803
            gen: int) -> dict[str, Any]:
    """`clients` clients at once, each sending `requests` completions in turn."""
    server.reset_peak()
    before, load = server.health()["stats"], os.getloadavg()[0]
    done: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait()
        for r in range(requests):
            i = (c * requests + r) % len(prompts)
            done[c].append(complete(server, P, prompts[i], gen) | {"prompt": i})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs = [r for rs in done for r in rs]
    after = server.health()["stats"]
    steps = after["steps"] - before["steps"]
    return {"P": P, "clients": clients, "requests": len(runs), **summary(runs),
            "rows_per_step": (after["tokens"] - before["tokens"]) / steps if steps else 0.0,
            "joined_running": after["joined_running"] - before["joined_running"],
            "peak_rss_mb": server.peak_mb(), "load_before": load, "load_after": os.getloadavg()[0]}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens, wall time (first request sent to last token), tokens/s, TTFT p50/p95 and the responses of `runs`."""
    wall = max(r["end"] for r in runs) - min(r["sent"] for r in runs)
    tokens = sum(len(r["tokens"]) for r in runs)
    ttfts = sorted(r["ttft_s"] for r in runs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * len(ttfts)))],
            "responses": [{"prompt": r["prompt"], "tokens": r["tokens"]} for r in runs]}


def join_latency(server: Server, P: int, prompts: list[list[int]], gen: int) -> dict[str, Any]:  # noqa: N803
    """The time to first token of a request sent while another one streams, against it alone."""
    alone = complete(server, P, prompts[1], gen)
    joined_before = server.health()["stats"]["joined_running"]
    ready = threading.Event()
    first: dict[str, Any] = {}
    streaming = threading.Thread(target=lambda: first.update(complete(
        server, P, prompts[0], gen, on_token=lambda n: n >= JOIN_AFTER and ready.set())))
    streaming.start()
    ready.wait(timeout=3600)
    joining = complete(server, P, prompts[1], gen)
    streaming.join()
    gaps = [b - a for a, b in zip(first["times"], first["times"][1:], strict=False)
            if joining["sent"] <= b <= joining["end"]]
    steady = [b - a for a, b in zip(first["times"], first["times"][1:], strict=False) if b < joining["sent"]]
    return {"P": P, "ttft_alone_s": alone["ttft_s"], "ttft_joining_s": joining["ttft_s"],
            "joined_running": server.health()["stats"]["joined_running"] - joined_before,
            "first_stream_gap_max_s": max(gaps, default=0.0), "first_stream_gap_before_s": statistics.median(steady),
            "responses": [{"prompt": 1, "tokens": alone["tokens"]}, {"prompt": 0, "tokens": first["tokens"]},
                          {"prompt": 1, "tokens": joining["tokens"]}]}


def scheduler_bound(model: Any, P: int, clients: int, requests: int, prompts: list[list[int]],  # noqa: N803
                    gen: int, max_batch: int) -> dict[str, Any]:
    """`measure`'s clients without the server around the scheduler: each submits its requests to a `Batcher`
    in this process and reads their tokens from its queue, as the server's request handlers do."""
    import asyncio

    from parscale.runtime.batch import RowSpec
    from parscale.runtime.sampling import SamplingConfig
    from parscale.serve.batcher import Batcher

    async def client(batcher: Batcher, c: int) -> list[dict[str, Any]]:
        loop, runs = asyncio.get_running_loop(), []
        for r in range(requests):
            i = (c * requests + r) % len(prompts)
            queue: asyncio.Queue[Any] = asyncio.Queue()
            spec = RowSpec(prompt=prompts[i], max_new_tokens=gen, sampling=SamplingConfig(temperature=0.0),
                           ignore_eos=True)
            sent, first, tokens = time.perf_counter(), 0.0, []
            batcher.submit([spec], P, loop, queue)
            while True:
                event = await queue.get()
                if event.error is not None:
                    raise SystemExit(f"the scheduler failed a request: {event.error}")
                if event.token is not None:
                    tokens.append(event.token)
                    first = first or time.perf_counter()
                if event.result is not None:
                    break
            runs.append({"prompt": i, "tokens": tokens, "sent": sent, "ttft_s": first - sent,
                         "end": time.perf_counter()})
        return runs

    async def run() -> list[dict[str, Any]]:
        batcher = Batcher(model, max_batch=max_batch, max_queue=2 * clients)
        batcher.start()
        try:
            done = await asyncio.gather(*(client(batcher, c) for c in range(clients)))
        finally:
            batcher.stop()
        return [r for rs in done for r in rs]

    load = os.getloadavg()[0]
    runs = asyncio.run(run())
    return {"P": P, "clients": clients, "gen": gen, **summary(runs), "load_before": load}


def bounds(export: Path, threads: int, clients: list[int], requests: int, prompts: list[list[int]],
           gens: list[int], max_batch: int, rounds: int) -> list[dict[str, Any]]:
    """`scheduler_bound` at P=1 for each client count and generation length, interleaved over `rounds`."""
    from parscale.runtime import Model

    cases = [(g, c) for g in gens for c in clients]
    if not cases:  # --bound-gen '', or no client count of 4 or fewer
        return []
    model = Model.load(export, threads=threads, verify=False)
    out = []
    for rnd in range(rounds):
        shift = rnd % len(cases)
        for g, c in cases[shift:] + cases[:shift]:
            out.append(scheduler_bound(model, 1, c, requests, prompts, g, max_batch))
            print(f"round {rnd + 1}: scheduler alone, P=1, {c} clients, {g} new tokens: "
                  f"{out[-1]['tokens_per_s']:.1f} tok/s, load {out[-1]['load_before']:.2f}", flush=True)
    return out


def check(export: Path, threads: int, prompts: list[list[int]], cases: list[dict], joins: list[dict],
          others: list[dict]) -> dict:
    """Every response the model's greedy continuation (within the tolerance); how many of those of `cases`
    and `joins` equal the 1-client one (`others`' are checked, not compared: their lengths may differ)."""
    from parscale.runtime import Model
    from parscale.serve.verify import check_greedy

    model = Model.load(export, threads=threads, verify=False)
    checked: dict[tuple, Any] = {}
    single = {(c["P"], r["prompt"]): r["tokens"] for c in cases if c["clients"] == 1 for r in c["responses"]}
    total = comparable = exact = 0
    groups = [(c["P"], c["responses"], True) for c in [*cases, *joins]] + [(c["P"], c["responses"], False)
                                                                          for c in others]
    for P, responses, compared in groups:
        for r in responses:
            key = (P, r["prompt"], tuple(r["tokens"]))
            if key not in checked:
                checked[key] = check_greedy(model, prompts[r["prompt"]], r["tokens"], P)
            total += 1
            if compared and (P, r["prompt"]) in single:
                comparable += 1
                exact += r["tokens"] == single[(P, r["prompt"])]
    worst = max(checked.values(), key=lambda c: c.worst - c.tolerance, default=None)
    return {"responses": total, "distinct": len(checked), "correct": sum(c.ok for c in checked.values()),
            "all_correct": all(c.ok for c in checked.values()),
            "worst_gap": max((c.worst for c in checked.values()), default=0.0),
            "noise": {"min": min((c.noise for c in checked.values()), default=0.0),
                      "max": max((c.noise for c in checked.values()), default=0.0)},
            "closest": None if worst is None else {"gap": worst.worst, "tolerance": worst.tolerance},
            "with_1_client_answer": comparable, "equal_to_1_client": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-serve"))
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=[*PRESETS.values(), "tiny"])
    ap.add_argument("--kind", default="int8", choices=["int8", "int4"])
    ap.add_argument("--P", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="Completions each client sends, one after the other.")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bound-gen", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256],
                    help="New tokens per request of the scheduler's bound at P=1 ('' skips it).")
    ap.add_argument("--name", default="serve", help="Results file name (benchmarks/results/NAME.{json,md}).")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    measured = commit("parscale", "benchmarks/serve.py", "benchmarks/common.py")  # at start: the code that ran
    export, made = prepare(args.work, args.preset, args.kind, args.P)
    vocab = json.loads((export / "config.json").read_text())["vocab_size"]
    prompts = [prompt_ids(vocab, args.prompt_len, seed=i) for i in range(max(args.clients) * args.requests)]
    server = Server(export, args.threads, args.max_batch, max_queue=2 * max(args.clients))
    runs: dict[str, list[dict]] = {}
    joins: list[dict] = []
    try:
        complete(server, args.P[0], prompts[0], 4)  # warm-up
        cases = [(P, c) for P in args.P for c in args.clients]
        for rnd in range(args.rounds):
            shift = rnd % len(cases)  # interleaved, each round starting elsewhere
            for P, c in cases[shift:] + cases[:shift]:
                r = measure(server, P, c, args.requests, prompts, args.gen)
                runs.setdefault(f"P={P} clients={c}", []).append(r)
                print(f"round {rnd + 1}: P={P}, {c} clients: {r['tokens_per_s']:.1f} tok/s, TTFT p50 "
                      f"{r['ttft_p50_s'] * 1000:.0f} ms, {r['rows_per_step']:.1f} rows/step, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB, load {r['load_before']:.2f}", flush=True)
            for P in args.P:
                joins.append(join_latency(server, P, prompts, args.gen))
                j = joins[-1]
                print(f"round {rnd + 1}: P={P} join: TTFT {j['ttft_joining_s'] * 1000:.0f} ms (alone "
                      f"{j['ttft_alone_s'] * 1000:.0f} ms), first stream's longest gap "
                      f"{j['first_stream_gap_max_s'] * 1000:.0f} ms", flush=True)
    finally:
        server.stop()
    bound = bounds(export, args.threads, [c for c in args.clients if c <= 4], args.requests, prompts, args.bound_gen,
                   args.max_batch, args.rounds) if 1 in args.P else []
    checked = check(export, args.threads, prompts, [r for rs in runs.values() for r in rs], joins, bound)
    result = {"meta": {**machine(), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "commit": measured,
                       "command": "python -m benchmarks.serve " + " ".join(sys.argv[1:]),
                       "server": " ".join(server.command[1:]), **{k: str(v) if isinstance(v, Path) else v
                                                                   for k, v in vars(args).items()}},
              "exports": made, "runs": runs, "joins": joins, "bound": bound, "check": checked}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(report(result))
    print(report(result))
    if not checked["all_correct"]:
        raise SystemExit(f"{checked['distinct'] - checked['correct']} responses were not the greedy continuation")


def report(r: dict) -> str:
    m, med = r["meta"], statistics.median
    rows = [f"`parscale serve`: {m['preset']} (random weights), {m['kind']}, P = {m['P']}, {m['threads']} threads, "
            f"--max-batch {m['max_batch']}; each client sends {m['requests']} streamed completions in turn "
            f"(prompt {m['prompt_len']} random ids, {m['gen']} new tokens, greedy); median of {m['rounds']} "
            "interleaved rounds.", "",
            f"Commit {m['commit']}; `{m['command']}`; started {m['started']}, finished {m['finished']}; "
            f"{m['cpu']}.", "",
            "| P | clients | tokens/s | x 1 client | TTFT p50 | TTFT p95 | rows/step | peak RSS | load avg (1 min) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    speed = {k: med(x["tokens_per_s"] for x in v) for k, v in r["runs"].items()}
    for key, runs in r["runs"].items():
        P, c = (int(x.split("=")[1]) for x in key.split())
        base = speed.get(f"P={P} clients=1")
        ratio = f"{speed[key] / base:.2f}" if base else "-"
        loads = ", ".join(f"{x['load_before']:.2f}" for x in runs)
        p50, p95 = (med(x[k] for x in runs) * 1000 for k in ("ttft_p50_s", "ttft_p95_s"))
        rows.append(f"| {P} | {c} | {speed[key]:.1f} | {ratio} | {p50:.0f} ms | {p95:.0f} ms "
                    f"| {med(x['rows_per_step'] for x in runs):.1f} | {med(x['peak_rss_mb'] for x in runs):,.0f} MB "
                    f"| {loads} |")
    one, four = speed.get("P=1 clients=1"), speed.get("P=1 clients=4")
    if one and four:
        rows += ["", f"Target: 4 clients >= {TARGET}x the tokens/s of 1 client at P=1, set for 128-token prompts "
                 f"and 64 new tokens (here {m['prompt_len']} and {m['gen']}): {four / one:.2f}x, "
                 + (("met." if four / one >= TARGET else "not met.") if (m["prompt_len"], m["gen"]) == (128, 64)
                    else "not the target's workload.")]
    rows += ["", "Join latency (a request sent once another stream has 8 tokens; medians):", "",
             "| P | TTFT joining | TTFT alone | joined the running batch | first stream: longest gap during the join "
             "| its usual gap |", "|---|---:|---:|---|---:|---:|"]
    for P in m["P"]:
        js = [j for j in r["joins"] if j["P"] == P]
        rows.append(f"| {P} | {med(j['ttft_joining_s'] for j in js) * 1000:.0f} ms | "
                    f"{med(j['ttft_alone_s'] for j in js) * 1000:.0f} ms | {sum(j['joined_running'] for j in js)} of "
                    f"{len(js)} | {med(j['first_stream_gap_max_s'] for j in js) * 1000:.0f} ms | "
                    f"{med(j['first_stream_gap_before_s'] for j in js) * 1000:.0f} ms |")
    rows += _bound_rows(r["bound"], m["gen"], speed)
    c = r["check"]
    closest = c["closest"] or {"gap": 0.0, "tolerance": 0.0}
    rows += ["", f"Checked: {c['responses']} responses ({c['distinct']} distinct) against the model at batch 1, no "
             f"padding; every token within its sequence's tolerance of the top logit (twice the change 1 or 32 "
             f"columns of left padding make to those logits, at least 0.05; the change measured "
             f"{c['noise']['min']:.2g} to {c['noise']['max']:.2g}): {'yes' if c['all_correct'] else 'NO'} "
             f"({c['correct']} of {c['distinct']}; largest gap {c['worst_gap']:.2g}; the closest to its tolerance "
             f"{closest['gap']:.2g} of {closest['tolerance']:.2g}); identical to the 1-client answer "
             f"of the same prompt: {c['equal_to_1_client']} of "
             f"{c['with_1_client_answer']} (the others' prompts were not sent by the single client)."]
    return "\n".join(rows) + "\n"


def _bound_rows(bound: list[dict], gen: int, served: dict[str, float]) -> list[str]:
    """The scheduler's bound: tokens/s per generation length and client count, beside the server's."""
    if not bound:
        return []
    med = statistics.median
    rows = ["", "The scheduler alone (P=1, no HTTP: the same clients submit straight to `Batcher` in one process, "
            "after the server stopped; medians):", "",
            "| new tokens | clients | tokens/s | x 1 client | the server's tokens/s | TTFT p50 | load avg (1 min) |",
            "|---:|---:|---:|---:|---:|---:|---|"]
    cases: dict[tuple[int, int], list[dict]] = {}
    for b in bound:
        cases.setdefault((b["gen"], b["clients"]), []).append(b)
    for (g, c), runs in sorted(cases.items()):
        speed = med(x["tokens_per_s"] for x in runs)
        base = cases.get((g, 1))
        ratio = f"{speed / med(x['tokens_per_s'] for x in base):.2f}" if base else "-"
        server = served.get(f"P=1 clients={c}") if g == gen else None
        loads = ", ".join(f"{x['load_before']:.2f}" for x in runs)
        rows.append(f"| {g} | {c} | {speed:.1f} | {ratio} | {f'{server:.1f}' if server else '-'} | "
                    f"{med(x['ttft_p50_s'] for x in runs) * 1000:.0f} ms | {loads} |")
    return rows


if __name__ == "__main__":
    main()
