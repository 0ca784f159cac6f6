"""Machine description and the markdown/JSON tables of a benchmark run (with ratios and targets)."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

LLAMA_TYPE = {"int8": "Q8_0", "int4": "Q4_0"}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    versions = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "torch", "numpy", "tokenizers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "versions": versions}


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not b.get(key) or a.get(key) is None:
        return None
    return a[key] / b[key]


def find(results: dict, kind: str, precision: str, batch: int, P: int | None = None) -> dict | None:  # noqa: N803
    """The result of `kind` ('ours', 'genai', 'llama', 'torch') at this precision, batch (and P), at its
    default settings (not one of the `--variants` shown beside it)."""
    for r in results.values():
        if r["kind"] == kind and r["precision"] == precision and r["batch"] == batch and (P is None or r["P"] == P) \
                and not r.get("variant"):
            return r
    return None


# Issue 20's targets, at batch 1: (precision, P, bound on our decode ms/token over genai P=1's).
DECODE_TARGETS = (("int8", 1, 0.95), ("int8", 4, 1.20), ("int8", 8, 1.50), ("int4", 1, 0.95), ("int4", 4, 1.45))
PREFILL_TARGET = 1.1  # our P=1 prefill tok/s over genai P=1's, at least


def targets(results: dict) -> list[tuple[str, float | None, float, str, bool | None]]:
    """(target, measured, bound, direction, met): issue 20's targets (batch 1, every system at its defaults)."""
    out: list[tuple[str, float | None, float, str, bool | None]] = []

    def add(label: str, value: float | None, bound: float, le: bool) -> None:
        met = None if value is None else (value <= bound if le else value >= bound)
        out.append((label, value, bound, "<=" if le else ">=", met))

    for prec, P, bound in DECODE_TARGETS:
        genai = find(results, "genai", prec, 1)
        add(f"our P={P} {prec} decode / genai P=1 {prec} decode",
            _ratio(find(results, "ours", prec, 1, P), genai, "decode_ms_per_token"), bound, True)
    for prec in ("int8", "int4"):
        add(f"our P=1 {prec} prefill tok/s / genai P=1 {prec} prefill tok/s",
            _ratio(find(results, "ours", prec, 1, 1), find(results, "genai", prec, 1), "prefill_tokens_per_s"),
            PREFILL_TARGET, False)
    return out


def _table(results: dict, batch: int) -> list[str]:
    lines = [
        f"### Batch {batch}",
        "",
        "| system | decode ms/token | x genai P=1 decode | x llama.cpp decode | prefill tok/s | x genai prefill "
        "| x llama.cpp prefill | first token ms | peak RSS gen. MB | files MB | KV MB | RSS / (files+KV) "
        "| load avg (median, min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [r for r in results.values() if r["batch"] == batch]
    order = {"ours": 0, "genai": 1, "llama": 2, "torch": 3}
    rows.sort(key=lambda r: (order.get(r["kind"], 9), r["precision"], r["P"]))
    for r in rows:
        genai = find(results, "genai", r["precision"], batch) if r["kind"] != "genai" else None
        llama = find(results, "llama", r["precision"], batch) if r["kind"] == "ours" else None
        loads = r.get("load_avg_1min_before_all", [r["load_avg_1min_before"]])
        files = r.get("files_mb") or r.get("weights_mb")
        lines.append(
            f"| {r['name']} | {r['decode_ms_per_token']:.2f} | {_fmt(_ratio(r, genai, 'decode_ms_per_token'))} "
            f"| {_fmt(_ratio(r, llama, 'decode_ms_per_token'))} | {r['prefill_tokens_per_s']:.1f} "
            f"| {_fmt(_ratio(r, genai, 'prefill_tokens_per_s'))} | {_fmt(_ratio(r, llama, 'prefill_tokens_per_s'))} "
            f"| {1000 * r['time_to_first_token_s']:.0f} | {r['generate_peak_rss_mb']:.0f} "
            f"| {_fmt(files, 1)} | {_fmt(r.get('kv_cache_mb'), 1)} | {_fmt(r.get('rss_ratio'))} "
            f"| {r['load_avg_1min_before']:.2f} ({min(loads):.2f}-{max(loads):.2f}) |"
        )
    return [*lines, ""]


def write_report(results: dict, meta: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    goals = targets(results)
    (folder / "bench.json").write_text(json.dumps(
        {"meta": meta, "results": results,
         "targets": [{"target": t, "value": v, "bound": b, "op": op, "met": m} for t, v, b, op, m in goals]},
        indent=2) + "\n")
    lines = [
        "# Benchmark: parscale runtime vs onnxruntime-genai vs llama.cpp",
        "",
        f"Command: `{meta['command']}` at commit `{meta.get('commit', 'unknown')}` ({meta['started']} to "
        f"{meta['finished']}).",
        f"Prompt {meta['prompt_len']} random token ids per sequence, {meta['gen']} new tokens (greedy, EOS ignored), "
        f"{meta['threads']} threads for every system, random `{meta['preset']}` weights "
        f"(`parscale init --preset {meta['preset']}`); each system in its own process; {meta['rounds']} "
        "interleaved round(s), each running every system once in an order rotated each round; every figure "
        "is the median across rounds, with the 1-minute load average before each run.",
        "Ours: `parscale bench` at its defaults (int4 by round-to-nearest); rows named with a kernel or a flag "
        "(`--spin`: idle workers spin) are variants shown beside them. genai: its own builder's P=1 build of "
        "the same P=1 weights, at its defaults (idle workers spin). llama.cpp at its defaults "
        f"{meta['llama_cpp']['commit']} (llama-cpp-python {meta['llama_cpp']['llama_cpp_python']} sdist): "
        "Q8_0 is int8's yardstick, Q4_0 int4's; its RSS includes loading. At batch B, decode ms/token is one "
        "step (each of the B sequences gets a token) and prefill tok/s counts all B prompts.",
        f"Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gb']} GiB RAM, {meta['os']}, "
        f"Python {meta['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        "",
    ]
    for b in sorted({r["batch"] for r in results.values()}):
        lines += _table(results, b)
    lines += ["Targets (batch 1, every system at its defaults):", "", "| target | measured | bound | met |",
              "|---|---:|---:|---|"]
    for label, value, bound, op, met in goals:
        lines.append(f"| {label} | {_fmt(value)} | {op} {bound:g} | "
                     f"{'n/a' if met is None else 'yes' if met else 'NO'} |")
    for title, items in (("Notes", meta.get("notes")), ("Failed runs", meta.get("failures"))):
        if items:
            lines += ["", f"{title}:", ""] + [f"- {x}" for x in items]
    lines += ["", "Commands per system:", ""] + [f"- {n}: `{r['command']}`" for n, r in results.items()]
    (folder / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
