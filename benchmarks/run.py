"""Benchmark harness: our runtime against PyTorch eager and onnxruntime-genai, in one go, on one machine.

    python benchmarks/run.py [--work /tmp/parscale-bench] [--threads 2] [--prompt-len 128] [--gen 64]

Prepares (once, cached in --work) random `qwen2.5-0.5b` checkpoints at P=1 and P=4, their exports
(fp32, and int8 when `parscale export --int8` exists), a plain HF Qwen2 folder of the P=1 weights
and genai's own int8/fp32 builds of it. Then runs every system in its own fresh process, one after
the other, and writes benchmarks/results/bench.{json,md} with ratios against the baselines of the
same run. Every figure is batch 1, greedy, exactly --gen new tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import machine, write_report

HERE = Path(__file__).resolve().parent

PY = sys.executable
PARSCALE = [PY, "-m", "parscale"]


def sh(cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; return its stdout; on failure show its output and stop."""
    print("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(cmd), flush=True)
    # cwd: the repository root, where `python -m benchmarks.<name>` finds this package.
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=HERE.parent)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def has_flag(flag: str) -> bool:
    return flag in subprocess.run([*PARSCALE, "export", "--help"], capture_output=True, text=True).stdout


def prepare(work: Path, threads: int, precisions: list[str], preset: str) -> dict[str, dict]:
    """Build whatever is missing; return {name: {kind, path, ...}} of the systems to run."""
    work.mkdir(parents=True, exist_ok=True)
    systems: dict[str, dict] = {}
    for P in (1, 4):
        ckpt = work / f"ckpt_p{P}"
        if not (ckpt / "config.json").is_file():
            sh([*PARSCALE, "init", str(ckpt), "--P", str(P), "--preset", preset, "--force"])
        systems[f"pytorch-eager P={P} fp32"] = {"kind": "torch", "path": ckpt, "P": P, "precision": "fp32"}
        # OpenMP's idle threads spin by default; passive waiting is the fair match of our no-spin choice.
        systems[f"pytorch-eager P={P} fp32 passive"] = {"kind": "torch", "path": ckpt, "P": P, "precision": "fp32",
                                                       "env": {"OMP_WAIT_POLICY": "PASSIVE"}}
        for prec in precisions:
            flag = {"fp32": None, "int8": "--int8", "int4": "--int4"}[prec]
            # accuracy_level 4 (int8 activations): what genai's builder uses; level 0 measured 23x slower.
            quant = [flag, "--accuracy-level", "4"] if flag else []
            if flag and not has_flag(flag):
                print(f"parscale export has no {flag}: skipping our {prec} runs", flush=True)
                continue
            out = work / f"export_p{P}_{prec}"
            if not (out / "parscale.json").is_file():
                # --no-validate: exactness is the tests' job; here only speed is measured.
                sh([*PARSCALE, "export", str(ckpt), "-o", str(out), "--P", str(P), "--force", "--no-validate",
                    *quant])
            systems[f"parscale P={P} {prec}"] = {"kind": "ours", "path": out, "P": P, "precision": prec}
    hf = work / "hf_qwen2_p1"
    if not (hf / "config.json").is_file():
        sh([PY, "-m", "benchmarks.genai_bench", "hf", str(work / "ckpt_p1"), str(hf)])
    for prec in ("int8", "fp32"):
        out = work / f"genai_{prec}"
        if not (out / "genai_config.json").is_file():
            sh([PY, "-m", "benchmarks.genai_bench", "build", str(hf), str(out), "--precision", prec,
                "--threads", str(threads)], log=work / f"genai_{prec}.log")
        systems[f"onnxruntime-genai P=1 {prec}"] = {"kind": "genai", "path": out, "P": 1, "precision": prec}
        systems[f"onnxruntime-genai P=1 {prec} no-spin"] = {"kind": "genai", "path": out, "P": 1, "precision": prec,
                                                            "extra": ["--no-spin"]}
    return systems


def measure(system: dict, threads: int, prompt_len: int, gen: int) -> dict:
    common = ["--prompt-len", str(prompt_len), "--gen", str(gen), "--threads", str(threads)]
    path = str(system["path"])
    if system["kind"] == "ours":
        cmd = [*PARSCALE, "bench", path, *common, "--provider", "cpu", "--json"]
    elif system["kind"] == "torch":
        cmd = [PY, "-m", "benchmarks.torch_eager", path, *common]
    else:
        cmd = [PY, "-m", "benchmarks.genai_bench", "run", path, *common, *system.get("extra", [])]
    load_before = os.getloadavg()[0]
    env = system.get("env", {})
    record = json.loads(sh(cmd, env=env).strip().splitlines()[-1])
    shown = " ".join([*(f"{k}={v}" for k, v in env.items()), *(Path(c).name if c == PY else c for c in cmd)])
    record.update(command=shown, load_avg_1min_before=load_before)
    return record


def median_record(records: list[dict]) -> dict:
    """The run with the median decode time (its other figures come from the same run)."""
    ordered = sorted(records, key=lambda r: r["decode_ms_per_token"])
    best = dict(ordered[len(ordered) // 2])
    best["decode_ms_per_token_all"] = [r["decode_ms_per_token"] for r in records]
    best["prefill_tokens_per_s_all"] = [r["prefill_tokens_per_s"] for r in records]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="Runs per system (interleaved); the median is kept.")
    ap.add_argument("--precisions", default="fp32,int8", help="Our export precisions to run.")
    ap.add_argument("--only", default="", help="Comma-separated substrings: run only matching systems.")
    ap.add_argument("--preset", default="qwen2.5-0.5b", help="Backbone of the random checkpoints.")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    systems = prepare(args.work, args.threads, args.precisions.split(","), args.preset)
    if args.only:
        keep = args.only.split(",")
        systems = {k: v for k, v in systems.items() if any(s in k for s in keep)}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(args.repeat):  # interleaved, so that drifting machine load hits every system alike
        for name, system in systems.items():
            record = measure(system, args.threads, args.prompt_len, args.gen)
            record.update(name=name, P=system["P"], precision=system["precision"], kind=system["kind"])
            runs[name].append(record)
            print(f"  {name}: decode {record['decode_ms_per_token']:.1f} ms/token, "
                  f"prefill {record['prefill_tokens_per_s']:.1f} tok/s", flush=True)
    results = {name: median_record(rs) for name, rs in runs.items()}
    meta = {**machine(), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]), "threads": args.threads,
            "prompt_len": args.prompt_len, "gen": args.gen, "repeat": args.repeat, "preset": args.preset,
            "decode_ms_median_spread": {k: statistics.pstdev(r["decode_ms_per_token"] for r in v)
                                        for k, v in runs.items()}}
    write_report(results, meta, args.results)


if __name__ == "__main__":
    main()
