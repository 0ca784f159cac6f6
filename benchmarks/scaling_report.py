"""The report of `benchmarks.scaling`: medians, increases over the backbone and their ratios, scaling.{json,md,png}.

Pure: the tests feed it synthetic measurements; `python -m benchmarks.scaling --rewrite` redraws from scaling.json.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.scaling_law import (
    EXPORT_FLAGS,
    FITS,
    KV_CONTEXT,
    PAPER_COST,
    PAPER_STATED,
    STREAMS,
    System,
    kv_cache_bytes,
    paper_ratios,
    prefix_bytes,
)

METRICS = ("decode_ms_per_step", "prefill_tokens_per_s", "latency_s", "time_to_first_token_s",
           "generate_peak_rss_mb", "files_bytes", "load_avg_1min")


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per key ("system|quant|batch"), the median of every metric over the rounds (each on its own)."""
    return {key: {m: statistics.median(r[m] for r in rs) for m in METRICS} | {"rounds": len(rs)}
            for key, rs in runs.items() if rs}


def key_of(system: str, quant: str, batch: int) -> str:
    return f"{system}|{quant}|{batch}"


def increases(med: dict[str, dict[str, Any]], quants: list[str], batches: list[int],
              kv_per_token: dict[str, int] | None = None, tokens: int = 0) -> list[dict[str, Any]]:
    """Each P's increase over its P=1 backbone against its dense equivalent's, per quant and batch.

    With `kv_per_token` (KV-cache bytes per token and sequence, by system) and `tokens` (prompt +
    generated, what the measured cache held), also the memory increase at a KV_CONTEXT-token
    context, estimated: measured peak RSS plus the cache's growth from `tokens` to KV_CONTEXT.
    """
    rows = []
    for q in quants:
        for b in batches:
            for P in STREAMS[1:]:
                names = ["ParScale P=1", f"ParScale P={P}", f"dense for P={P}"]
                base, par, den = (med.get(key_of(n, q, b)) for n in names)
                if not (base and par and den):
                    continue
                row: dict[str, Any] = {"P": P, "quant": q, "batch": b}
                for name, metric in (("memory", "generate_peak_rss_mb"), ("latency", "latency_s"),
                                     ("decode", "decode_ms_per_step"), ("files", "files_bytes")):
                    p_inc, d_inc = par[metric] - base[metric], den[metric] - base[metric]
                    row[f"{name}_parscale"], row[f"{name}_dense"] = p_inc, d_inc
                    row[f"{name}_parscale_pct"] = 100 * p_inc / base[metric]
                    row[f"{name}_dense_pct"] = 100 * d_inc / base[metric]
                    row[f"{name}_ratio"] = d_inc / p_inc if p_inc > 0 else None
                if kv_per_token and all(n in kv_per_token for n in names):
                    grow = {n: b * kv_per_token[n] * (KV_CONTEXT - tokens) / 1e6 for n in names}
                    peaks = (base["generate_peak_rss_mb"], par["generate_peak_rss_mb"], den["generate_peak_rss_mb"])
                    at_1k = {n: peak + grow[n] for n, peak in zip(names, peaks, strict=True)}
                    p_inc, d_inc = at_1k[names[1]] - at_1k[names[0]], at_1k[names[2]] - at_1k[names[0]]
                    row["memory_1k_parscale"], row["memory_1k_dense"] = p_inc, d_inc
                    row["memory_1k_ratio"] = d_inc / p_inc if p_inc > 0 else None
                rows.append(row)
    return rows


def fmt_params(n: float) -> str:
    """A parameter count: 86.6 k, 357.9 M, 1.572 B."""
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M" if n >= 1e6 else f"{n / 1e3:,.1f} k"


def _num(x: float) -> str:
    """A measured figure: whole numbers from 100 up, else three significant digits."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f}" if n_bytes >= 100e6 else f"{n_bytes / 1e6:.2f}"


def _ratio(x: float | None) -> str:
    return "n/a (ParScale increase <= 0)" if x is None else f"{x:.1f}x"


def markdown(report: dict[str, Any]) -> str:
    meta, fit = report["meta"], FITS[report["meta"]["fit"]]
    lines = [
        "# Scaling: P streams against parameters, on this CPU",
        "",
        f"Command: `{meta['command']}` at commit `{meta['commit']}` ({meta['started']} to {meta['finished']}).",
        f"Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, {meta['memory_gb']} GiB RAM; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        f"Backbone `{meta['preset']}` (random weights, `parscale init`); {meta['threads']} threads; prompt "
        f"{meta['prompt_len']} random ids, {meta['gen']} new tokens (greedy, EOS ignored); each figure the median "
        f"of {meta['rounds']} interleaved round(s), every export in its own process "
        f"({meta.get('prepare_s', 0) / 60:.0f} min building what --work lacked, "
        f"{meta.get('measure_s', 0) / 60:.0f} min measuring); exports "
        f"`parscale export --no-validate` with " + ", ".join(f"{q}: `{' '.join(EXPORT_FLAGS[q]) or '(float)'}`"
                                                          for q in meta["quant"]) + ".",
    ]
    if meta["rounds"] < 5:
        lines += ["", f"**{meta['rounds']} round(s): a smoke run, not a result (the study takes 5 or more).**"]
    lines += [
        "",
        "## Quality-equivalent dense models",
        "",
        f"Law: L = (A / (N (k ln P + 1)))^alpha + E, {fit.dataset} fit (k = {fit.k:.4f}, R^2 {fit.r2}; "
        "arXiv 2505.10475 Section 3.2, constants from the authors' parametric_fit.py). N: non-embedding "
        "parameters, ParScale's prefixes and aggregation included.",
        "",
        "| model | P | non-embedding params | x (k ln P + 1) | quality-equivalent | dense model built "
        "| its non-embedding | all params | shape |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    eq = report["systems"]
    for s in (x for x in eq if x["kind"] == "parscale"):
        d = next((x for x in eq if x["kind"] == "dense" and x["P"] == s["P"]), None)
        head = (f"| ParScale P={s['P']} | {s['P']} | {fmt_params(s['shape']['non_embedding'])} "
                f"| {fit.k * math.log(s['P']) + 1:.3f} | {fmt_params(s['equivalent_params'])} ")
        if d is None:
            lines.append(head + f"| (the backbone) | - | {fmt_params(s['shape']['total'])} | backbone |")
            continue
        off = 100 * (d["shape"]["non_embedding"] / s["equivalent_params"] - 1)
        lines.append(head + f"| {d['shape']['label']} | {fmt_params(d['shape']['non_embedding'])} ({off:+.1f} %) "
                     f"| {fmt_params(d['shape']['total'])} | {d['shape']['kind']} |")
    lines += [
        "",
        "## Measurements",
        "",
        "Latency: the whole call (prefill of the prompt and every decode step). Decode: ms per step, each step "
        "one token for every sequence of the batch. Peak RSS: while generating, weights included. KV @1k: the "
        f"cache at {KV_CONTEXT} tokens, batch 1, float32, from the config; prefix: ParScale's prefix keys/values "
        "(float32 constants in our graph, counted in files). Load: the 1-minute load average before the run "
        "(median, and range over the rounds).",
        "",
        "| model | quant | batch | decode ms/step | prefill tok/s | latency s | peak RSS MB | files MB | KV @1k MB "
        "| prefix MB | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in report["medians"].items():
        name, q, b = key.split("|")
        s = next(x for x in eq if x["name"] == name)
        loads = [x["load_avg_1min"] for x in report["runs"][key]]
        lines.append(
            f"| {name} | {q} | {b} | {_num(r['decode_ms_per_step'])} | {_num(r['prefill_tokens_per_s'])} "
            f"| {_num(r['latency_s'])} | {r['generate_peak_rss_mb']:.0f} | {_mb(r['files_bytes'])} "
            f"| {_mb(s['kv_1k_bytes'])} | {_mb(s['prefix_bytes'])} "
            f"| {r['load_avg_1min']:.1f} ({min(loads):.1f}-{max(loads):.1f}) |")
    lines += [
        "",
        "## Increase over the P=1 backbone: ParScale against its quality-equivalent dense model",
        "",
        "Ratio: the dense model's increase over ParScale's (the paper's \"x less increase\"). At 1k context: the "
        f"memory ratio with every KV cache grown from {meta['prompt_len'] + meta['gen']} to {KV_CONTEXT} tokens "
        "(measured peak plus the computed growth; ParScale's cache is P times the backbone's). Paper: its cost "
        "model (A100, llm-analysis) for its 1.6B backbone at the same batch, dense equivalent by measured loss "
        "(Figure 4's method) / by the law (ours); the paper states only P=8, batch 1: 22x memory, 6x latency.",
        "",
        "| P | quant | batch | memory MB: ParScale | dense | ratio | at 1k context (est.) | latency s: ParScale "
        "| dense | ratio | decode ratio | paper memory ratio (loss / law) | paper latency ratio (loss / law) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    paper = report["paper"]
    for r in report["increases"]:
        pl, pw = (paper["by_loss"].get(str(r["batch"]), {}).get(str(r["P"])),
                  paper["by_law"].get(str(r["batch"]), {}).get(str(r["P"])))
        pm = f"{pl['memory_ratio']:.1f}x / {pw['memory_ratio']:.1f}x" if pl and pw else "-"
        pt = f"{pl['latency_ratio']:.1f}x / {pw['latency_ratio']:.1f}x" if pl and pw else "-"
        lines.append(
            f"| {r['P']} | {r['quant']} | {r['batch']} "
            f"| {r['memory_parscale']:+.0f} ({r['memory_parscale_pct']:+.1f} %) "
            f"| {r['memory_dense']:+.0f} ({r['memory_dense_pct']:+.1f} %) | {_ratio(r['memory_ratio'])} "
            f"| {_ratio(r.get('memory_1k_ratio')) if 'memory_1k_ratio' in r else '-'} "
            f"| {r['latency_parscale']:+.3g} ({r['latency_parscale_pct']:+.1f} %) "
            f"| {r['latency_dense']:+.3g} ({r['latency_dense_pct']:+.1f} %) | {_ratio(r['latency_ratio'])} "
            f"| {_ratio(r['decode_ratio'])} | {pm} | {pt} |")
    lines += [
        "",
        f"Paper, stated: {paper['stated']['memory_ratio']:g}x less memory increase and "
        f"{paper['stated']['latency_ratio']:g}x less latency increase ({paper['stated']['source']}). Its cost model "
        "reproduced from the authors' code: " + "; ".join(
            f"batch {b}, P={P}: {v['memory_ratio']:.1f}x / {v['latency_ratio']:.1f}x (equivalent "
            f"{v['equivalent_params'] / 1e9:.2f} B)" for b, d in paper["by_loss"].items() for P, v in d.items()) + ".",
        "",
        "![memory and latency increase against quality-equivalent size](scaling.png)",
        "",
        "Every figure comes from one fresh process, `python -m benchmarks.scaling _measure EXPORT --batch B "
        f"--prompt-len {meta['prompt_len']} --gen {meta['gen']} --threads {meta['threads']}` (the exact command "
        "of each is in scaling.json, `commands`); a negative ratio means the dense model came out cheaper than the "
        "backbone.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Memory and latency increase (% of the P=1 backbone) against quality-equivalent size, both kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in report["increases"]}) or [1]
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4.2 * len(batches)), squeeze=False)
    n0 = next(s for s in report["systems"] if s["name"] == "ParScale P=1")["shape"]["non_embedding"]
    xs = {s["P"]: s["equivalent_params"] / n0 for s in report["systems"] if s["kind"] == "parscale"}
    dense_x = {s["P"]: s["shape"]["non_embedding"] / n0 for s in report["systems"] if s["kind"] == "dense"}
    styles = {"int8": "-", "int4": "--", "fp32": ":"}
    for row, b in enumerate(batches):
        for col, what in enumerate(("memory", "latency")):
            ax = axes[row][col]
            for q in sorted({r["quant"] for r in report["increases"]}):
                rs = sorted((r for r in report["increases"] if r["quant"] == q and r["batch"] == b),
                            key=lambda r: r["P"])
                if not rs:
                    continue
                ax.plot([1] + [xs[r["P"]] for r in rs], [0] + [r[f"{what}_parscale_pct"] for r in rs],
                        styles.get(q, "-"), marker="o", color="tab:blue", label=f"ParScale P=1, 2, 4, 8: {q}, ours")
                ax.plot([1] + [dense_x[r["P"]] for r in rs], [0] + [r[f"{what}_dense_pct"] for r in rs],
                        styles.get(q, "-"), marker="s", color="tab:red", label=f"dense of the same quality: {q}, ours")
                if q == sorted({r["quant"] for r in report["increases"]})[0]:
                    for r in rs:
                        ax.annotate(f"P={r['P']}", (xs[r["P"]], r[f"{what}_parscale_pct"]),
                                    textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:blue")
            paper = report["paper"]["by_loss"].get(str(b), {})
            if paper:
                ps = sorted(paper.items(), key=lambda kv: int(kv[0]))
                ax.plot([1] + [v["x"] for _, v in ps], [0] + [v[f"parscale_{what}_pct"] for _, v in ps], ":",
                        marker="^", color="gray", label="ParScale: the paper's cost model (1.6B, A100)")
                ax.plot([1] + [v["x"] for _, v in ps], [0] + [v[f"dense_{what}_pct"] for _, v in ps], ":",
                        marker="D", color="black", label="dense of equal measured loss: the paper's cost model")
            ax.set_xlabel("quality-equivalent size: non-embedding parameters / P=1 backbone")
            ax.set_ylabel(f"{what} increase over the P=1 backbone (%)")
            ax.set_title(f"{what}, batch {b}" + (" (peak RSS while generating)" if what == "memory" else
                                                 " (prompt + generation, one call)"))
            ax.grid(alpha=0.3)
    meta = report["meta"]
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"ParScale against parameter scaling on {meta['logical_cpus']} CPUs, backbone {meta['preset']}, "
                 f"commit {meta['commit']}\nthe paper (1.6B, P=8, batch 1, A100 cost model): "
                 f"{PAPER_STATED['memory_ratio']:g}x less memory increase, {PAPER_STATED['latency_ratio']:g}x less "
                 "latency increase than parameter scaling", fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if len(batches) > 1 else 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paper_section(batches: list[int], fit: str) -> dict[str, Any]:
    """The paper's stated headline, and its cost model at the batches it covers: dense equivalent by loss, by law."""
    return {"stated": PAPER_STATED} | {
        f"by_{eq}": {str(b): {str(P): v for P, v in paper_ratios(b, eq, fit).items()}
                     for b in batches if b in PAPER_COST}
        for eq in ("loss", "law")}


def write(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "scaling.md").write_text(markdown(report))
    plot(report, folder / "scaling.png")


def system_record(s: System) -> dict[str, Any]:
    return {"name": s.name, "kind": s.kind, "P": s.P, "slug": s.slug, "equivalent_params": s.equivalent_params,
            "shape": asdict(s.shape), "config": s.config, "kv_1k_bytes": kv_cache_bytes(s.config),
            "prefix_bytes": prefix_bytes(s.config)}


