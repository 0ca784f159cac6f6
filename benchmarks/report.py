"""Machine description and the markdown/JSON tables of a benchmark run (with ratios and targets)."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path


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


def _get(results: dict, name: str) -> dict | None:
    return results.get(name)


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or not b.get(key):
        return None
    return a[key] / b[key]


def best_genai(results: dict, precision: str, key: str = "decode_ms_per_token") -> dict | None:
    """The stronger of genai's two configurations (spinning workers or not) on `key`."""
    runs = [r for r in results.values() if r["kind"] == "genai" and r["precision"] == precision]
    if not runs:
        return None
    return min(runs, key=lambda r: r[key]) if key == "decode_ms_per_token" else max(runs, key=lambda r: r[key])


def best_torch(results: dict, P: int) -> dict | None:  # noqa: N803
    """The faster PyTorch eager configuration (OpenMP threads spinning or passive) at this P."""
    runs = [r for r in results.values() if r["kind"] == "torch" and r["P"] == P]
    return min(runs, key=lambda r: r["decode_ms_per_token"]) if runs else None


def targets(results: dict) -> list[tuple[str, float | None, float, str, bool | None]]:
    """(target, measured ratio, bound, direction, met), always against genai's better configuration."""
    genai8 = best_genai(results, "int8")
    out: list[tuple[str, float | None, float, str, bool | None]] = []

    def add(label: str, value: float | None, bound: float, le: bool) -> None:
        met = None if value is None else (value <= bound if le else value >= bound)
        out.append((label, value, bound, "<=" if le else ">=", met))

    add("P=4 int8 decode / genai P=1 int8 decode", _ratio(_get(results, "parscale P=4 int8"), genai8,
                                                          "decode_ms_per_token"), 1.25, True)
    add("P=1 int8 decode / genai P=1 int8 decode", _ratio(_get(results, "parscale P=1 int8"), genai8,
                                                          "decode_ms_per_token"), 1.10, True)
    for prec in ("int8", "fp32"):
        torch4, ours4 = best_torch(results, 4), _get(results, f"parscale P=4 {prec}")
        add(f"PyTorch eager P=4 fp32 decode / our P=4 {prec} decode",
            _ratio(torch4, ours4, "decode_ms_per_token"), 3.0, False)
    for prec in ("int8", "fp32"):
        add(f"P=1 {prec} prefill tok/s / genai P=1 {prec} prefill",
            _ratio(_get(results, f"parscale P=1 {prec}"), best_genai(results, prec, "prefill_tokens_per_s"),
                   "prefill_tokens_per_s"), 1.0, False)
    for name, r in results.items():
        if r["kind"] == "ours":
            add(f"{name}: peak RSS generating / (files + KV cache)", r.get("rss_ratio"), 1.15, True)
    return out


def write_report(results: dict, meta: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    goals = targets(results)
    (folder / "bench.json").write_text(json.dumps(
        {"meta": meta, "results": results,
         "targets": [{"target": t, "value": v, "bound": b, "op": op, "met": m} for t, v, b, op, m in goals]},
        indent=2) + "\n")
    genai8 = best_genai(results, "int8")
    lines = [
        "# Benchmark: parscale runtime vs PyTorch eager vs onnxruntime-genai",
        "",
        f"Command: `{meta['command']}` ({meta['started']} to {meta['finished']}).",
        f"Batch 1, prompt {meta['prompt_len']} random token ids, {meta['gen']} new tokens (greedy, EOS ignored), "
        f"{meta['threads']} threads, random `{meta['preset']}` weights (`parscale init --preset {meta['preset']}`); "
        f"each system in its own process, median of {meta['repeat']} interleaved run(s).",
        f"Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gb']} GiB RAM, {meta['os']}, "
        f"Python {meta['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        "",
        "| system | decode ms/token | x best genai P=1 int8 | x best PyTorch same P | prefill tok/s | first token ms "
        "| peak RSS gen. MB | files MB | RSS / (files+KV) | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        torch_same = best_torch(results, r["P"])
        vs_genai = _ratio(r, genai8, "decode_ms_per_token")
        vs_torch = _ratio(r, torch_same, "decode_ms_per_token")
        files = r.get("files_mb") or r.get("weights_mb")
        rss_ratio = r.get("rss_ratio")
        lines.append(
            f"| {name} | {r['decode_ms_per_token']:.1f} | {_fmt(vs_genai)} | {_fmt(vs_torch)} "
            f"| {r['prefill_tokens_per_s']:.1f} | {1000 * r['time_to_first_token_s']:.0f} "
            f"| {r['generate_peak_rss_mb']:.0f} | {files:.0f} | {_fmt(rss_ratio)} | {r['load_avg_1min_before']:.1f} |"
        )
    lines += ["", "Targets (issue 5):", "", "| target | measured | bound | met |", "|---|---:|---:|---|"]
    for label, value, bound, op, met in goals:
        lines.append(f"| {label} | {_fmt(value)} | {op} {bound:g} | "
                     f"{'n/a' if met is None else 'yes' if met else 'NO'} |")
    lines += ["", "Commands per system:", ""] + [f"- {n}: `{r['command']}`" for n, r in results.items()]
    (folder / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
