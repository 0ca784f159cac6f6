"""Wall time and peak memory of `parscale export` per stage, at the sizes people deploy.

    python -m benchmarks.export_memory [--work DIR] [--cases 1.5b-p8:int8 3b-p4:int4 ...] [--append]

Each case makes (once, cached in --work) a random bf16 checkpoint with `parscale init --preset ...`
and runs the default command, `parscale export CKPT -o OUT --int8|--int4 --force --verbose`
(validation on), in a child process. A case with several P (0.5b-p1,2,4,8:int8) exports them as one
multi-P export (`--P 1,2,4,8`) of the largest P's checkpoint, given random head sets for the others.
The parent samples the child's resident memory (VmRSS) every 0.1 s and assigns each sample to the
stage the child last printed, so the table shows where the peak is. Cases run one after the other;
the 1-minute load average is printed beside each.
Writes benchmarks/results/export_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from parscale.config import ParScaleConfig
from parscale.exporter.budget import param_count, plan
from parscale.exporter.quant.policy import default_scheme
from parscale.modeling.heads import head_sets
from parscale.modeling.random_init import init_heads

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {"0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "3b": "qwen2.5-3b"}
DEFAULT_CASES = ["1.5b-p8:int8", "1.5b-p8:int4", "3b-p4:int8", "3b-p4:int4"]
_CASE = re.compile(r"^(0\.5b|1\.5b|3b)-p(\d+(?:,\d+)*):(fp32|int8|int4)$")
_STAGE = re.compile(r"^\s*(\d+\.\d)s (.+)$")


def _rss(pid: int) -> int:
    """Resident bytes of a process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(case: str, work: Path) -> dict:
    m = _CASE.match(case)
    if m is None:
        raise SystemExit(f"bad case {case!r}: expected e.g. 3b-p4:int4 (sizes 0.5b, 1.5b, 3b; fp32, int8, int4)")
    size, streams, kind = m.group(1), [int(p) for p in m.group(2).split(",")], m.group(3)
    P = max(streams)
    ckpt = work / f"ckpt-{size}-p{P}"
    cli = [sys.executable, "-m", "parscale"]
    if not (ckpt / "config.json").is_file():
        subprocess.run([*cli, "init", str(ckpt), "--preset", PRESETS[size], "--P", str(P), "--force"], check=True)
    missing = [p for p in streams if p not in head_sets(ckpt)]
    if missing:
        init_heads(ckpt, missing)
    cfg = ParScaleConfig.load(ckpt)
    out = work / f"out-{size}-p{m.group(2).replace(',', '-')}-{kind}"
    cmd = [*cli, "export", str(ckpt), "-o", str(out), "--force", "--verbose"]
    if len(streams) > 1:
        cmd += ["--P", m.group(2)]
    if kind != "fp32":
        cmd.append(f"--{kind}")
    scheme = default_scheme(int(kind[3:])) if kind != "fp32" else None
    estimate = plan(cfg, dtype="fp32", quantize=scheme, validate=True)
    print("$", " ".join(cmd), flush=True)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages: dict[str, dict] = {}
    current = ["starting"]
    stages["starting"] = {"start_s": 0.0, "peak_rss": 0}
    lines: list[str] = []

    def sample() -> None:
        while child.poll() is None:
            rss = _rss(child.pid)
            st = stages[current[0]]
            st["peak_rss"] = max(st["peak_rss"], rss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stdout is not None
    for line in child.stdout:
        lines.append(line)
        sys.stdout.write(line)
        hit = _STAGE.match(line)
        if hit and not hit.group(2).startswith(" "):
            stages[hit.group(2)] = {"start_s": float(hit.group(1)), "peak_rss": 0}
            current[0] = hit.group(2)
    code = child.wait()
    sampler.join()
    wall = time.perf_counter() - started
    names = list(stages)
    for a, b in zip(names, [*names[1:], None], strict=True):
        stages[a]["seconds"] = (stages[b]["start_s"] if b else wall) - stages[a]["start_s"]
    peak = max(s["peak_rss"] for s in stages.values())
    record = {
        "case": case, "preset": PRESETS[size], "P": P, "kind": kind, "command": " ".join(cmd[2:]),
        "exit_code": code, "params": param_count(cfg), "fp32_weight_bytes": 4 * param_count(cfg),
        "wall_s": wall, "peak_rss": peak, "peak_over_fp32": peak / (4 * param_count(cfg)),
        "estimated_peak": estimate.peak_bytes, "load_avg_1m_before": load, "load_avg_1m_after": os.getloadavg()[0],
        "stages": stages, "tail": "".join(lines[-8:]),
        "export_bytes": sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else None,
    }
    print(f"{case}: exit {code}, {wall / 60:.1f} min, peak RSS {peak / 2**30:.2f} GiB "
          f"({record['peak_over_fp32']:.2f}x fp32 weights), load {load:.2f}", flush=True)
    return record


def write_report(records: list[dict], path: Path) -> None:
    gib = 2**30
    rows = ["| case | fp32 weights | exit | wall | peak RSS | peak / fp32 weights | estimate | largest stage "
            "| load avg (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        top = max(r["stages"], key=lambda s: r["stages"][s]["peak_rss"])
        rows.append(f"| {r['case']} (`{r['preset']}`, P={r['P']}) | {r['fp32_weight_bytes'] / gib:.2f} GiB "
                    f"| {r['exit_code']} | {r['wall_s'] / 60:.1f} min | {r['peak_rss'] / gib:.2f} GiB "
                    f"| {r['peak_over_fp32']:.2f} | {r['estimated_peak'] / gib:.1f} GiB | {top} "
                    f"| {r['load_avg_1m_before']:.2f} / {r['load_avg_1m_after']:.2f} |")
    rows += ["", "Per stage (seconds, peak RSS in GiB):", ""]
    for r in records:
        stages = ", ".join(f"{name} {s['seconds']:.0f} s / {s['peak_rss'] / gib:.2f}" for name, s in r["stages"].items()
                           if s["seconds"] >= 0.5 or s["peak_rss"] > gib)
        rows.append(f"- **{r['case']}**: {stages}")
    path.write_text("\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-export-mem"))
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    ap.add_argument("--name", default="export_memory", help="results file stem in benchmarks/results/")
    ap.add_argument("--append", action="store_true",
                    help="keep the other cases already in the results file (a case run again replaces its row)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    records = json.loads(path.read_text()) if args.append and path.is_file() else []
    for case in args.cases:
        record = run_case(case, args.work)
        records = [r for r in records if r["case"] != record["case"]] + [record]
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(records, indent=2) + "\n")
        write_report(records, RESULTS / f"{args.name}.md")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
