"""Benchmark harness: our runtime against onnxruntime-genai and llama.cpp, in one run, on one machine.

    python -m benchmarks.run [--work /tmp/parscale-bench] [--rounds 5] [--threads 2] [--prompt-len 128] [--gen 64]

Prepares (once, cached in --work) random checkpoints (`parscale init --preset`) at P=1,2,4,8, their
int8 and int4 exports (int4 by round-to-nearest: latency and memory do not depend on how the codes
were chosen), onnxruntime-genai's own int8/int4 builds of the P=1 weights and llama.cpp's Q8_0/Q4_0
GGUFs of them. Then runs every system at every batch size in its own fresh process, in --rounds
interleaved rounds (each round runs every system once, in an order rotated by one each round), and
writes results/bench.{json,md}: the median of each figure across rounds, with ratios against genai
and llama.cpp of the same run, and the load average before every run.
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

from benchmarks import common, llamacpp
from benchmarks.report import machine, write_report

HERE = Path(__file__).resolve().parent

PY = sys.executable
PARSCALE = [PY, "-m", "parscale"]
GGUF_TYPE = {"int8": "q8_0", "int4": "q4_0"}  # llama.cpp's yardstick for each of our precisions
# --variants: ours with a non-default setting, shown beside the defaults:
# name -> (precision, export flags (none: the default export), bench flags).
VARIANTS = {
    "int8-nbits": ("int8", ["--kernel", "MatMulNBits"], []),
    "int8-integer": ("int8", ["--kernel", "MatMulIntegerToFloat"], []),
    "int8-spin": ("int8", [], ["--spin"]),
    "int4-spin": ("int4", [], ["--spin"]),
}
MEDIAN_KEYS = ("decode_ms_per_token", "prefill_tokens_per_s", "time_to_first_token_s", "generate_peak_rss_mb",
               "peak_rss_mb", "rss_ratio", "load_avg_1min_before", "load_s")


class FailedError(Exception):
    pass


def sh(cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; return its stdout; on failure show its output and raise FailedError."""
    print("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(cmd), flush=True)
    # cwd: the repository root, where `python -m benchmarks.<name>` finds this package.
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=HERE.parent)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise FailedError(f"failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def has_flag(flag: str) -> bool:
    return flag in subprocess.run([*PARSCALE, "export", "--help"], capture_output=True, text=True).stdout


def prepare(args: argparse.Namespace) -> tuple[dict[str, dict], list[str]]:
    """Build whatever is missing; return ({name: {kind, path, P, precision, label}}, skip notes)."""
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    systems: dict[str, dict] = {}
    notes: list[str] = []
    precisions = [p for p in args.precisions.split(",") if p]
    rtn = has_flag("--method")
    for P in sorted({1, *args.P}):
        ckpt = work / f"ckpt_p{P}"
        if not (ckpt / "config.json").is_file():
            sh([*PARSCALE, "init", str(ckpt), "--P", str(P), "--preset", args.preset, "--force"])
        if P not in args.P:
            continue  # P=1 weights are always made: genai and llama.cpp run them
        if args.torch:
            systems[f"pytorch-eager P={P} fp32"] = {"kind": "torch", "path": ckpt, "P": P, "precision": "fp32",
                                                   "batches": [1]}
        for prec in precisions:
            flag = {"fp32": None, "int8": "--int8", "int4": "--int4"}[prec]
            # accuracy_level 4 (int8 activations): what genai's builder uses; level 0 measured 23x slower.
            quant = [flag, "--accuracy-level", "4"] if flag else []
            label = prec
            if prec == "int4" and rtn:
                quant += ["--method", "rtn"]
                label = "int4 (rtn)"
            if flag and not has_flag(flag):
                notes.append(f"parscale export has no {flag}: our {prec} runs skipped")
                print(notes[-1], flush=True)
                continue
            out = work / f"export_p{P}_{prec}"
            if not (out / "parscale.json").is_file():
                # Validation stays on: the exports timed are ones that passed the exporter's checks.
                sh([*PARSCALE, "export", str(ckpt), "-o", str(out), "--P", str(P), "--force", *quant],
                   log=work / f"export_p{P}_{prec}.log")
            systems[f"parscale P={P} {label}"] = {"kind": "ours", "path": out, "P": P, "precision": prec}
        for variant in args.variants:
            prec, flags, bench_flags = VARIANTS[variant]
            out = work / (f"export_p{P}_{variant}" if flags else f"export_p{P}_{prec}")
            if flags and not (out / "parscale.json").is_file():
                sh([*PARSCALE, "export", str(ckpt), "-o", str(out), "--P", str(P), "--force", f"--{prec}", *flags],
                   log=work / f"export_p{P}_{variant}.log")
            if not (out / "parscale.json").is_file():
                continue  # the default export it reuses was skipped above (noted there)
            systems[f"parscale P={P} {prec} ({(flags or bench_flags)[-1]})"] = {
                "kind": "ours", "path": out, "P": P, "precision": prec, "variant": variant, "flags": bench_flags}
    hf = work / "hf_qwen2_p1"
    if not (hf / "config.json").is_file():
        sh([PY, "-m", "benchmarks.genai_bench", "hf", str(work / "ckpt_p1"), str(hf)])
    for prec in precisions:
        out = work / f"genai_{prec}"
        if not (out / "genai_config.json").is_file():
            sh([PY, "-m", "benchmarks.genai_bench", "build", str(hf), str(out), "--precision", prec,
                "--threads", str(args.threads)], log=work / f"genai_{prec}.log")
        # genai as its users get it: its own defaults (idle workers spin), threads pinned like every system's.
        systems[f"onnxruntime-genai P=1 {prec}"] = {"kind": "genai", "path": out, "P": 1, "precision": prec}
    llama_precs = [p for p in precisions if p in GGUF_TYPE]
    if llama_precs and not args.no_llama:
        tools = llamacpp.build(args.llama_work)  # prints "llama.cpp skipped: <why>" and returns None
        if tools is None:
            notes.append("llama.cpp skipped (see the line above in the log)")
        for prec in llama_precs if tools else []:
            qtype = GGUF_TYPE[prec]
            gguf = work / f"llama_p1_{qtype}.gguf"
            if not gguf.is_file():
                try:
                    llamacpp.write_gguf(work / "ckpt_p1", gguf, qtype, tools, args.threads)
                except (subprocess.CalledProcessError, OSError) as e:
                    notes.append(f"llama.cpp {qtype.upper()} skipped: no GGUF of the {args.preset} weights ({e})")
                    print(notes[-1], flush=True)
                    continue
            systems[f"llama.cpp {qtype.upper()}"] = {"kind": "llama", "path": gguf, "P": 1, "precision": prec}
    return systems, notes


def measure(system: dict, args: argparse.Namespace, batch: int) -> dict:
    common = ["--prompt-len", str(args.prompt_len), "--gen", str(args.gen), "--threads", str(args.threads)]
    path = str(system["path"])
    if system["kind"] == "ours":
        cmd = [*PARSCALE, "bench", path, *common, "--batch", str(batch), "--provider", "cpu", "--json",
               *system.get("flags", [])]
    elif system["kind"] == "torch":
        cmd = [PY, "-m", "benchmarks.torch_eager", path, *common]
    elif system["kind"] == "genai":
        cmd = [PY, "-m", "benchmarks.genai_bench", "run", path, *common, "--batch", str(batch)]
    else:
        # --reps 1: one timed run after llama.cpp's own warm-up, as for the others.
        cmd = [PY, "-m", "benchmarks.llamacpp", "run", path, *common, "--batch", str(batch), "--reps", "1",
               "--work", str(args.llama_work)]
    load_before = os.getloadavg()[0]
    record = json.loads(sh(cmd).strip().splitlines()[-1])
    shown = " ".join(Path(c).name if c == PY else c for c in cmd)
    record.update(command=shown, load_avg_1min_before=load_before)
    return record


def median_record(records: list[dict]) -> dict:
    """Each figure's median across rounds (other fields from the first round); every value kept in *_all."""
    out = dict(records[0])
    for key in MEDIAN_KEYS:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_all"] = values
    out["rounds"] = len(records)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-bench"))
    ap.add_argument("--llama-work", type=Path, default=None,
                    help="llama.cpp source and binaries (cached; default WORK/llamacpp).")
    ap.add_argument("--threads", type=int, default=2, help="Threads of every system.")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5,
                    help="Interleaved rounds (each runs every system once, order rotated); medians are kept.")
    ap.add_argument("--P", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8],
                    help="Our P values (comma-separated).")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                    help="Batch sizes (comma-separated).")
    ap.add_argument("--precisions", default="int8,int4", help="Precisions (int8, int4, fp32; comma-separated).")
    ap.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=[],
                    help=f"Our exports with another setting, beside the defaults ({', '.join(VARIANTS)}).")
    ap.add_argument("--torch", action="store_true", help="Add PyTorch eager fp32 (batch 1).")
    ap.add_argument("--no-llama", action="store_true", help="Leave llama.cpp out.")
    ap.add_argument("--only", default="", help="Comma-separated substrings: run only matching systems.")
    ap.add_argument("--preset", default="qwen2.5-0.5b", help="Backbone of the random checkpoints.")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        ap.error(f"unknown --variants {', '.join(unknown)}: known are {', '.join(VARIANTS)}")
    if args.llama_work is None:
        args.llama_work = args.work / "llamacpp"

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    measured = common.commit("parscale", "benchmarks")  # at start: the code every figure below ran on
    systems, notes = prepare(args)
    runs_of = [(name, b) for name, s in systems.items() for b in args.batches if b in s.get("batches", args.batches)]
    if args.only:
        keep = args.only.split(",")
        runs_of = [(n, b) for n, b in runs_of if any(s in f"{n} batch {b}" for s in keep)]
    runs: dict[tuple[str, int], list[dict]] = {key: [] for key in runs_of}
    failures: list[str] = []
    for rnd in range(args.rounds):  # interleaved, so that drifting machine load hits every system alike
        shift = rnd % max(1, len(runs_of))
        order = runs_of[shift:] + runs_of[:shift]
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
        for name, batch in order:
            system = systems[name]
            try:
                record = measure(system, args, batch)
            except (FailedError, json.JSONDecodeError, IndexError) as e:
                failures.append(f"round {rnd + 1}, {name} batch {batch}: {e}")
                print(f"  FAILED {failures[-1]}", flush=True)
                continue
            record.update(name=name, batch=batch, P=system["P"], precision=system["precision"],
                          kind=system["kind"], round=rnd + 1, variant=system.get("variant"))
            runs[(name, batch)].append(record)
            print(f"  {name} batch {batch}: decode {record['decode_ms_per_token']:.2f} ms/token, "
                  f"prefill {record['prefill_tokens_per_s']:.1f} tok/s, "
                  f"peak RSS {record['generate_peak_rss_mb']:.0f} MB, "
                  f"load avg before {record['load_avg_1min_before']:.2f}", flush=True)
    results = {f"{n} | batch {b}": median_record(rs) for (n, b), rs in runs.items() if rs}
    meta = {**machine(), "commit": measured, "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]), "threads": args.threads,
            "prompt_len": args.prompt_len, "gen": args.gen, "rounds": args.rounds, "preset": args.preset,
            "batches": args.batches, "notes": notes, "failures": failures,
            "llama_cpp": {"llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON, "commit": llamacpp.LLAMA_CPP_COMMIT}}
    write_report(results, meta, args.results)


if __name__ == "__main__":
    main()
