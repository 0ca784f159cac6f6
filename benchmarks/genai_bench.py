"""onnxruntime-genai baseline: its own model builder on a plain Qwen2 folder, then its runtime.

    python -m benchmarks.genai_bench hf CKPT_P1 HF_DIR          # P=1 checkpoint -> plain HF Qwen2 folder
    python -m benchmarks.genai_bench build HF_DIR OUT --precision int8|int4|fp32|fp16 [--ep cpu|cuda]
    python -m benchmarks.genai_bench run OUT --prompt-len 128 --gen 64 --threads 2 [--batch 4] [--no-spin]

With --batch B, B random prompts (the first is batch 1's) go in as one 2-D append_tokens with the
search option batch_size=B; decode_ms_per_token is then one step (each sequence gets a token) and
prefill tokens/s counts all B prompts, as in `parscale bench --batch`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit, max_rss_mb, peak_rss_mb, prompt_ids, reset_peak_rss


def make_hf_qwen2(ckpt: Path, out: Path) -> Path:
    """A P=1 ParScale checkpoint is a Qwen2 one: same tensors; only the config's type differs."""
    config = json.loads((ckpt / "config.json").read_text())
    if config.get("parscale_n", 1) != 1:
        raise SystemExit(f"{ckpt} has parscale_n={config['parscale_n']}: the genai baseline needs P=1")
    out.mkdir(parents=True, exist_ok=True)
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    for key in ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth"):
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in ckpt.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


def build(hf_dir: Path, out: Path, precision: str, threads: int, ep: str = "cpu") -> Path:
    """Run genai's builder for execution provider `ep` (cpu, cuda), then pin its session to `threads`
    intra-op threads."""
    cache = out.parent / (out.name + ".cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", hf_dir.name, "-i", str(hf_dir),
           "-o", str(out), "-p", precision, "-e", ep, "-c", str(cache)]
    subprocess.run(cmd, check=True)
    shutil.rmtree(cache, ignore_errors=True)
    set_threads(out, threads)
    return out


SPIN_KEY = "session.intra_op.allow_spinning"


def set_threads(out: Path, threads: int, spin: bool = True) -> None:
    """Pin genai's session to `threads` intra-op threads; spin=False makes idle workers sleep."""
    path = out / "genai_config.json"
    config = json.loads(path.read_text())
    opts = config["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    if spin:
        opts.pop(SPIN_KEY, None)  # ORT's default: spin
    else:
        opts[SPIN_KEY] = "0"
    path.write_text(json.dumps(config, indent=2) + "\n")


def run(model_dir: Path, prompt_len: int, gen: int, threads: int, spin: bool = True, batch: int = 1) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    set_threads(model_dir, threads, spin)
    t0 = time.perf_counter()
    model = og.Model(str(model_dir))
    load_s = time.perf_counter() - t0
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(0)  # prompt_ids' generator: row 0 is batch 1's prompt
    ids = np.array([rng.integers(0, vocab, size=prompt_len) for _ in range(batch)], dtype=np.int32)
    assert ids[0].tolist() == prompt_ids(vocab, prompt_len)

    def once(n: int) -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        # min_length: random weights may emit EOS; every system must make exactly `n` tokens.
        params.set_search_options(do_sample=False, max_length=prompt_len + n, min_length=prompt_len + n,
                                  batch_size=batch)
        g = og.Generator(model, params)
        t = time.perf_counter()
        g.append_tokens(ids if batch > 1 else ids[0])  # prefill: runs the model on the prompt(s)
        prefill = time.perf_counter() - t
        steps = []
        for _ in range(n):
            t = time.perf_counter()
            g.generate_next_token()  # picks a token from the last logits, then (after the first) runs the model
            steps.append(time.perf_counter() - t)
        return prefill, steps

    once(4)  # warm-up, like `parscale bench`
    reset_peak_rss()
    prefill, steps = once(gen)
    # The first call only picks the token from the prefill logits; each later call runs one decode step.
    return {
        "system": "onnxruntime-genai", "model": str(model_dir), "threads": threads, "spin": spin, "batch": batch,
        "prompt_len": prompt_len, "gen": gen, "load_s": load_s, "time_to_first_token_s": prefill + steps[0],
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_ms_per_token": 1000 * sum(steps[1:]) / (len(steps) - 1),
        "generate_peak_rss_mb": peak_rss_mb(), "peak_rss_mb": max_rss_mb(),
        "files_mb": sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file()) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf")
    a.add_argument("ckpt", type=Path)
    a.add_argument("out", type=Path)
    a = sub.add_parser("build")
    a.add_argument("hf_dir", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--precision", default="int8")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--ep", default="cpu", help="genai's execution provider: cpu or cuda.")
    a = sub.add_parser("run")
    a.add_argument("model_dir", type=Path)
    a.add_argument("--prompt-len", type=int, default=128)
    a.add_argument("--gen", type=int, default=64)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--out", type=Path)
    a.add_argument("--no-spin", action="store_true", help="Idle ORT workers sleep (as parscale's default).")
    a.add_argument("--batch", type=int, default=1, help="Prompts generated together.")
    args = ap.parse_args()
    if args.cmd == "hf":
        make_hf_qwen2(args.ckpt, args.out)
    elif args.cmd == "build":
        build(args.hf_dir, args.out, args.precision, args.threads, args.ep)
    else:
        emit(run(args.model_dir, args.prompt_len, args.gen, args.threads, spin=not args.no_spin,
                 batch=args.batch), args.out)


if __name__ == "__main__":
    main()
