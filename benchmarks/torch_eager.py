"""PyTorch baseline: the project's module (parscale.modeling.model) in eager fp32 with its KV cache.

This is what a user would run without our runtime. Batch 1, greedy, exactly `gen` new tokens.

    python -m benchmarks.torch_eager CKPT --prompt-len 128 --gen 64 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import emit, max_rss_mb, peak_rss_mb, prompt_ids, reset_peak_rss
from parscale.modeling.checkpoint import load_model


def generate(model: torch.nn.Module, ids: list[int], n: int) -> tuple[float, list[float]]:
    """Prefill seconds and per-step seconds of n - 1 cached decode steps (n tokens in all)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        t = time.perf_counter()
        logits, cache = model(x, num_logits_to_keep=1)
        token = logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - t
        mask = torch.ones(1, len(ids), dtype=torch.int64)
        steps = []
        for i in range(n - 1):
            t = time.perf_counter()
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], dim=1)
            logits, cache = model(token, mask, torch.tensor([[len(ids) + i]]), cache, 1)
            token = logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
    return prefill, steps


def run(ckpt: Path, prompt_len: int, gen: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    t0 = time.perf_counter()
    cfg, model = load_model(ckpt, torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    ids = prompt_ids(cfg.vocab_size, prompt_len)
    generate(model, ids, 4)  # warm-up
    reset_peak_rss()
    prefill, steps = generate(model, ids, gen)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "system": "pytorch-eager", "model": str(ckpt), "P": cfg.P, "dtype": "fp32", "threads": threads,
        "torch": torch.__version__, "prompt_len": prompt_len, "gen": gen, "load_s": load_s,
        "time_to_first_token_s": prefill, "prefill_tokens_per_s": prompt_len / prefill,
        "decode_ms_per_token": 1000 * sum(steps) / len(steps),
        "generate_peak_rss_mb": peak_rss_mb(), "peak_rss_mb": max_rss_mb(), "weights_mb": weights / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    emit(run(args.ckpt, args.prompt_len, args.gen, args.threads), args.out)


if __name__ == "__main__":
    main()
