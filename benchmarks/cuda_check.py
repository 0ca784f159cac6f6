"""P streams on a CUDA GPU: our exports at P = 1, 4, 8 (fp16, int4, int8) against onnxruntime-genai's CUDA build.

    python -m benchmarks.cuda_check --work DIR [--preset qwen2.5-0.5b] [--rounds 3] [--provider cuda]

Run by benchmarks/cuda_check.sh on a machine with a GPU, onnxruntime-gpu and onnxruntime-genai-cuda.
On a GPU, MatMulNBits has a batched kernel for 2 to 16 rows that reads each weight once, so P rows
should cost nearly what one does. Within a few minutes this:

1. makes random checkpoints of the preset (`parscale init`): one at P=8 with a random head set for
   P=4 (P=1 is its backbone), and one at P=1 for genai's builder;
2. writes three multi-P exports of the first (P = 1, 4, 8, one graph each; `--no-validate`, the
   CPU tests hold the accuracy): fp16, int4 (round-to-nearest) with fp16 activations, and int8
   with fp16 activations (MatMulNBits: the integer GEMM kernel has no CUDA implementation), all
   three at once in separate processes;
3. builds genai's own fp16, int4 and int8 CUDA models of the P=1 weights (a precision its builder
   refuses is reported and left out);
4. measures, over interleaved rounds in fresh processes, decode ms/token and prefill tok/s at batch 1
   (`parscale bench --provider cuda --P 1,4,8`, one process per export, and genai's runtime), and
   writes DIR/cuda_check.{json,md} with the ratios to genai's P=1 of the same precision.

`--provider cpu --preset tiny` runs the same steps on the CPU, to check the script itself.
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

from benchmarks.genai_bench import make_hf_qwen2
from benchmarks.report import machine

PY = sys.executable
PARSCALE = [PY, "-m", "parscale"]
STREAMS = [1, 4, 8]
# name -> our export flags; genai's builder precision of the same name.
PRECISIONS = {
    "fp16": ["--dtype", "fp16"],
    "int4": ["--int4", "--method", "rtn", "--dtype", "fp16"],
    "int8": ["--int8", "--kernel", "MatMulNBits", "--dtype", "fp16"],
}


def sh(cmd: list[str], log: Path | None = None) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    return r


def prepare(work: Path, preset: str, provider: str) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """Checkpoints, our exports and genai's builds (cached in `work`); returns them and any notes."""
    from parscale.modeling.random_init import init_heads

    notes: list[str] = []
    ckpt, ckpt1 = work / "ckpt_p8", work / "ckpt_p1"
    for path, P in ((ckpt, 8), (ckpt1, 1)):
        if not (path / "config.json").is_file():
            r = sh([*PARSCALE, "init", str(path), "--P", str(P), "--preset", preset, "--force"])
            if r.returncode:
                raise SystemExit(r.stderr)
    if not (ckpt / "heads-p4.safetensors").is_file():
        init_heads(ckpt, [4])
    ours = {name: work / f"ours_{name}" for name in PRECISIONS}
    jobs = []
    for name, flags in PRECISIONS.items():  # the three exports at once: one process each
        if not (ours[name] / "parscale.json").is_file():
            cmd = [*PARSCALE, "export", str(ckpt), "--P", ",".join(map(str, STREAMS)), "-o", str(ours[name]),
                   "--force", "--no-validate", *flags]
            print("$", " ".join(cmd), flush=True)
            jobs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for name, job in jobs:
        log = job.communicate()[0]
        (work / f"ours_{name}.log").write_text(log)
        if job.returncode:
            notes.append(f"our {name} export failed: {log.strip().splitlines()[-1] if log.strip() else '?'}")
            ours.pop(name)
    hf = make_hf_qwen2(ckpt1, work / "hf_p1") if not (work / "hf_p1" / "config.json").is_file() else work / "hf_p1"
    genai = {}
    ep = "cuda" if provider == "cuda" else "cpu"
    for name in PRECISIONS:
        out = work / f"genai_{name}_{ep}"
        if not (out / "genai_config.json").is_file():
            r = sh([PY, "-m", "benchmarks.genai_bench", "build", str(hf), str(out), "--precision", name, "--ep", ep],
                   log=work / f"genai_{name}.log")
            if r.returncode:
                notes.append(f"genai's builder refused {name} for {ep}: {(r.stdout + r.stderr).strip()[-300:]}")
                continue
        genai[name] = out
    return ours, genai, notes


def measure(kind: str, path: Path, provider: str, prompt_len: int, gen: int) -> list[dict]:
    if kind == "ours":
        cmd = [*PARSCALE, "bench", str(path), "--provider", provider, "--P", ",".join(map(str, STREAMS)),
               "--prompt-len", str(prompt_len), "--gen", str(gen), "--json", "--no-verify"]
    else:
        cmd = [PY, "-m", "benchmarks.genai_bench", "run", str(path), "--prompt-len", str(prompt_len),
               "--gen", str(gen)]
    r = sh(cmd)
    if r.returncode:
        raise RuntimeError(r.stderr.strip()[-500:])
    data = json.loads(r.stdout.strip().splitlines()[-1])
    return data if isinstance(data, list) else [data]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-cuda"))
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--results", type=Path, default=None, help="Folder for cuda_check.{json,md} (default: --work).")
    args = ap.parse_args()
    if args.provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"onnxruntime {ort.__version__} has no CUDA provider here "
                             f"({', '.join(ort.get_available_providers())}): install onnxruntime-gpu")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ours, genai, notes = prepare(args.work, args.preset, args.provider)
    prepared_s = time.perf_counter() - t0
    systems = [("ours", n, p) for n, p in ours.items()] + [("genai", n, p) for n, p in genai.items()]
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        shift = rnd % len(systems)
        for kind, name, path in systems[shift:] + systems[:shift]:
            try:
                records = measure(kind, path, args.provider, args.prompt_len, args.gen)
            except RuntimeError as e:
                notes.append(f"round {rnd + 1}, {kind} {name}: {e}")
                continue
            for rec in records:
                rec["load_avg_1min"] = os.getloadavg()[0]
                runs.setdefault((kind, name, rec.get("P", 1)), []).append(rec)
    results = {}
    for (kind, name, P), recs in runs.items():
        results[f"{kind} {name} P={P}"] = {
            "kind": kind, "precision": name, "P": P, "rounds": len(recs),
            **{k: statistics.median(r[k] for r in recs) for k in ("decode_ms_per_token", "prefill_tokens_per_s")},
        }
    lines = [f"# CUDA check ({args.provider})", "",
             f"`python -m benchmarks.cuda_check {' '.join(sys.argv[1:])}`, {started}; preparing took "
             f"{prepared_s / 60:.1f} min. Batch 1, prompt {args.prompt_len}, {args.gen} new tokens, medians of "
             f"{args.rounds} interleaved rounds. Ours: one multi-P export per precision (P = 1, 4, 8).", "",
             "| system | decode ms/token | x genai P=1 | prefill tok/s | x genai P=1 |", "|---|---:|---:|---:|---:|"]
    for key, r in sorted(results.items(), key=lambda kv: (kv[1]["precision"], kv[1]["kind"] != "genai", kv[1]["P"])):
        base = results.get(f"genai {r['precision']} P=1")
        dec = f"{r['decode_ms_per_token'] / base['decode_ms_per_token']:.2f}" if base else "-"
        pre = f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}" if base else "-"
        lines.append(f"| {key} | {r['decode_ms_per_token']:.2f} | {dec} | {r['prefill_tokens_per_s']:.0f} | {pre} |")
    lines += ["", *(f"- {n}" for n in notes)]
    folder = args.results or args.work
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cuda_check.json").write_text(json.dumps({"machine": machine(), "started": started, "notes": notes,
                                                        "results": results}, indent=2) + "\n")
    (folder / "cuda_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
