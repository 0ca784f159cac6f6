"""The paper's headline on this CPU: what P streams cost in memory and latency next to parameter scaling.

    python -m benchmarks.scaling [--preset qwen2.5-0.5b] [--quant int8 int4] [--rounds 5] [--threads 2]
                                 [--batch 1 4] [--work /tmp/parscale-scaling] [--results benchmarks/results]
    python -m benchmarks.scaling --rewrite       # scaling.md and scaling.png again from scaling.json

ParScale (Chen et al. 2025, arXiv 2505.10475) fits, in Section 3.2 (Equation 5),

    L = (A / (N (k ln P + 1)))^alpha + E          (N: non-embedding parameters, P: streams)

so P streams on N parameters reach the loss of a dense model with N (k ln P + 1) parameters. This
script builds, for one backbone, random checkpoints at P = 1, 2, 4, 8 and the dense (P=1) models
the law says match each P (same code path, `parscale.modeling.random_init`), exports every one with
`parscale export` (int8; int4 by round-to-nearest, whose bytes and graph are those of the GPTQ
default), and measures each export in its own process with our runtime, interleaved over
`--rounds` rounds: decode ms/step and prefill tokens/s at batch 1 and 4, the latency of the whole
call (prompt `--prompt-len`, `--gen` new tokens: the paper's 64/64 by default), peak RSS while
generating, files on disk, and the KV cache at a 1k-token context computed from the config. It
then sets the memory and latency increase of each P over its P=1 backbone against the increase
of the quality-equivalent dense model, beside the paper's figures, and writes
`scaling.{json,md,png}` into `--results`. Checkpoints and exports are cached in `--work`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import common, run
from benchmarks.report import machine
from benchmarks.run import HERE, PARSCALE, PY
from benchmarks.scaling_law import (
    DEFAULT_FIT,
    EXPORT_FLAGS,
    FITS,
    PRESETS,
    System,
    families,
    kv_cache_bytes,
    systems_for,
)
from benchmarks.scaling_report import fmt_params, increases, key_of, medians, paper_section, system_record, write


def sh(cmd: list[Any]) -> str:
    """benchmarks.run.sh (from the repository root; on failure its output, and stop) with paths and numbers as text."""
    try:
        return run.sh([str(c) for c in cmd])
    except run.FailedError as e:  # the study cannot go on without this step: one line, no traceback
        raise SystemExit(str(e)) from None


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "parscale_n", "parscale_n_tokens", "tie_word_embeddings")


def _same_shape(folder: Path, config: dict[str, Any]) -> bool:
    try:
        have = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == config.get(k) for k in SHAPE_KEYS)


def prepare(systems: list[System], preset: str, quants: list[str], work: Path,
            drop_checkpoints: bool = False) -> dict[tuple[str, str], Path]:
    """Checkpoints and exports, built once and reused while their shape matches: {(system, quant): export}.

    A checkpoint is made only when one of its exports is missing; `drop_checkpoints` deletes it once
    its exports exist (they are all the study reads: 8 GB of bf16 checkpoints at 0.5B, 27 GB at 1.5B).
    """
    fam = families()[preset]
    exports: dict[tuple[str, str], Path] = {}
    for s in systems:
        ckpt = work / preset / f"ckpt-{s.slug}"
        outs = {q: work / preset / f"export-{s.slug}-{q}" for q in quants}
        missing = [q for q, out in outs.items()
                   if not ((out / "parscale.json").is_file() and _same_shape(out, s.config))]
        if missing and not _same_shape(ckpt, s.config):
            if s.overrides:  # not a preset: the library's init with the shape's config keys
                sh([PY, "-m", "benchmarks.scaling", "_init", ckpt, "--base", fam.base, "--P", s.config["parscale_n"],
                    "--prefix", s.config["parscale_n_tokens"], "--overrides", json.dumps(s.overrides)])
            else:
                sh([*PARSCALE, "init", ckpt, "--preset", preset, "--P", s.config["parscale_n"],
                    "--prefix", s.config["parscale_n_tokens"], "--force"])
        for q in missing:
            # --no-validate: exactness is the test suite's job; only cost is measured here.
            sh([*PARSCALE, "export", ckpt, "-o", outs[q], "--P", s.config["parscale_n"], "--force", "--no-validate",
                *EXPORT_FLAGS[q]])
        if drop_checkpoints and ckpt.is_dir():
            shutil.rmtree(ckpt)
        exports.update({(s.name, q): out for q, out in outs.items()})
    return exports


# --------------------------------------------------------------------------------------------------
# One measurement, in a fresh process (`_measure`).
# --------------------------------------------------------------------------------------------------


def measure_export(path: Path, batch: int, prompt_len: int, gen: int, threads: int) -> dict[str, Any]:
    """Load, warm up with the same batch, then time one greedy call of `batch` prompts (EOS ignored).

    Peak RSS is the kernel's high-water mark reset after the warm-up: the memory of generating,
    weights included (what `parscale bench` reports, for any batch).
    """
    from benchmarks.common import peak_rss_mb, prompt_ids, reset_peak_rss
    from parscale.runtime import Model

    t0 = time.perf_counter()
    m = Model.load(path, provider="cpu", threads=threads, verify=False)
    load_s = time.perf_counter() - t0
    prompts = [prompt_ids(m.vocab_size, prompt_len, seed=row) for row in range(batch)]
    m.generate(prompts, max_new_tokens=min(gen, 4), ignore_eos=True)
    hwm = reset_peak_rss()
    t0 = time.perf_counter()
    results = m.generate(prompts, max_new_tokens=gen, ignore_eos=True)
    wall = time.perf_counter() - t0
    assert isinstance(results, list)
    t = results[0].timings
    return {
        "P": m.P, "batch": batch, "prompt_len": prompt_len, "gen": gen, "threads": threads, "load_s": load_s,
        "latency_s": wall, "time_to_first_token_s": t.time_to_first_token_s,
        "prefill_tokens_per_s": t.prefill_tokens_per_s, "decode_ms_per_step": t.decode_ms_per_token,
        "generate_peak_rss_mb": peak_rss_mb() if hwm else -1.0, "files_bytes": m.manifest.total_bytes,
    }


def run_measure(path: Path, batch: int, prompt_len: int, gen: int, threads: int) -> tuple[dict[str, Any], str]:
    """One `_measure` process: its record (with the load average before it) and the command, as shown."""
    args = ["_measure", path, "--batch", batch, "--prompt-len", prompt_len, "--gen", gen, "--threads", threads]
    load = os.getloadavg()[0]
    out = sh([PY, "-m", "benchmarks.scaling", *args])
    return ({**json.loads(out.strip().splitlines()[-1]), "load_avg_1min": load},
            " ".join(["python -m benchmarks.scaling", *map(str, args)]))


def commit() -> str:
    # The code a measurement depends on: the library, the study's modules, and the shared helpers they use.
    return common.commit("parscale", "benchmarks/scaling*.py", "benchmarks/common.py", "benchmarks/run.py")


def study(args: argparse.Namespace) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    measured = commit()  # at start: the code every figure below ran on
    fit = FITS[args.fit]
    systems = systems_for(args.preset, fit, args.dense_scaling, args.prefix)
    for s in systems:
        print(f"{s.name}: {s.shape.label} ({s.shape.kind}), {fmt_params(s.shape.non_embedding)} non-embedding, "
              f"quality-equivalent {fmt_params(s.equivalent_params)}", flush=True)
    t_prepare = time.perf_counter()
    exports = prepare(systems, args.preset, args.quant, args.work, args.drop_checkpoints)
    prepare_s = time.perf_counter() - t_prepare
    jobs = [(s, q, b) for s in systems for q in args.quant for b in args.batch]
    runs: dict[str, list[dict[str, Any]]] = {key_of(s.name, q, b): [] for s, q, b in jobs}
    commands: dict[str, str] = {}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        # Interleaved, each round starting elsewhere, so that drifting load hits every system alike.
        shift = (rnd * len(jobs)) // max(args.rounds, 1)
        for n, (s, q, b) in enumerate(jobs[shift:] + jobs[:shift]):
            key = key_of(s.name, q, b)
            record, commands[key] = run_measure(exports[(s.name, q)], b, args.prompt_len, args.gen, args.threads)
            runs[key].append(record)
            done = rnd * len(jobs) + n + 1
            eta = (time.perf_counter() - t_start) / done * (args.rounds * len(jobs) - done)
            print(f"  [{done}/{args.rounds * len(jobs)}, ~{eta / 60:.0f} min left] {key}: decode "
                  f"{record['decode_ms_per_step']:.1f} ms/step, latency {record['latency_s']:.2f} s, "
                  f"RSS {record['generate_peak_rss_mb']:.0f} MB, load {record['load_avg_1min']:.1f}", flush=True)
    med = medians(runs)
    report = {
        "meta": {**machine(), "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:]), "commit": measured,
                 "preset": args.preset, "quant": args.quant, "batch": args.batch, "threads": args.threads,
                 "rounds": args.rounds, "prompt_len": args.prompt_len, "gen": args.gen, "fit": args.fit,
                 "dense_scaling": args.dense_scaling, "prefix": args.prefix, "work": str(args.work),
                 "prepare_s": prepare_s, "measure_s": time.perf_counter() - t_start},
        "law": asdict(fit),
        "systems": [system_record(s) for s in systems],
        "runs": runs, "medians": med,
        "increases": increases(med, args.quant, args.batch, {s.name: kv_cache_bytes(s.config, 1) for s in systems},
                               args.prompt_len + args.gen),
        "paper": paper_section(args.batch, args.fit), "commands": commands,
    }
    write(report, args.results)
    print((args.results / "scaling.md").read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_measure", "_init"):
        internal(sys.argv[1], sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b", choices=PRESETS, help="Backbone.")
    ap.add_argument("--quant", nargs="+", default=["int8", "int4"], choices=sorted(EXPORT_FLAGS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5,
                    help="Interleaved rounds; medians are reported (5 or more for a result).")
    ap.add_argument("--prompt-len", type=int, default=64, help="The paper's cost_analysis.py default.")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=48, help="ParScale prefix tokens per stream (the paper's 48).")
    ap.add_argument("--fit", default=DEFAULT_FIT, choices=sorted(FITS), help="Which fitted k picks the dense models.")
    ap.add_argument("--dense-scaling", default="width", choices=["width", "depth"],
                    help="How dense models grow from the backbone (the paper's: width at fixed depth).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/parscale-scaling"),
                    help="Checkpoints and exports, reused by later runs.")
    ap.add_argument("--drop-checkpoints", action="store_true",
                    help="Delete each checkpoint once its exports exist (disk: 27 GB of them at 1.5B).")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--rewrite", action="store_true",
                    help="Only rewrite scaling.md and scaling.png from the scaling.json in --results.")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.rewrite:
        write(json.loads((args.results / "scaling.json").read_text()), args.results)
        return
    study(args)


def internal(cmd: str, argv: list[str]) -> None:
    """`_measure PATH ...` (one measurement, torch-free) and `_init OUT ...` (a checkpoint of a custom shape)."""
    if cmd == "_measure":
        mp = argparse.ArgumentParser(prog="scaling _measure")
        mp.add_argument("path", type=Path)
        for name, default in (("--batch", 1), ("--prompt-len", 64), ("--gen", 64), ("--threads", 2)):
            mp.add_argument(name, type=int, default=default)
        a = mp.parse_args(argv)
        print(json.dumps(measure_export(a.path, a.batch, a.prompt_len, a.gen, a.threads)))
        return
    ip = argparse.ArgumentParser(prog="scaling _init")
    ip.add_argument("out", type=Path)
    ip.add_argument("--base", required=True)
    ip.add_argument("--P", type=int, required=True)
    ip.add_argument("--prefix", type=int, default=48)
    ip.add_argument("--overrides", default="{}")
    a = ip.parse_args(argv)
    from parscale.modeling.random_init import init_checkpoint

    init_checkpoint(a.out, P=a.P, preset=a.base, prefix=a.prefix, overrides=json.loads(a.overrides), force=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
