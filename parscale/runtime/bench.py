"""`parscale bench`: prefill speed, decode latency, time to first token and peak memory of an export."""

from __future__ import annotations

import dataclasses
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from parscale.args import check_generation, check_int, check_threads
from parscale.driver import SPIN_DEFAULT
from parscale.runtime.api import Model
from parscale.runtime.memory import check_cache_fits


@dataclass
class BenchResult:
    """One benchmark run (greedy, EOS ignored so that exactly `gen` tokens are made per sequence).

    With batch B: B prompts of `prompt_len` ids run together; prefill tokens/s counts all B prompts,
    decode_ms_per_token is one decode step (which gives each of the B sequences a token), and the KV
    cache holds all B sequences.
    """

    model: str
    P: int
    dtype: str
    quantization: str | None
    provider: str
    threads: int | None
    prompt_len: int
    gen: int
    load_s: float
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_ms_per_token: float | None  # None with gen 1: prefill makes the only token, no decode step runs
    peak_rss_mb: float  # whole process, load included (ru_maxrss)
    generate_peak_rss_mb: float  # high-water mark while generating (reset after load), -1 if unknown
    files_mb: float  # the export's files on disk
    kv_cache_mb: float  # the cache at its largest (prompt + generated tokens, all B sequences)
    batch: int = 1
    spin: bool = False  # idle ONNX Runtime workers spun

    @property
    def rss_ratio(self) -> float:
        """Peak RSS while generating over (files on disk + KV cache): the issue's memory target."""
        peak = self.generate_peak_rss_mb if self.generate_peak_rss_mb > 0 else self.peak_rss_mb
        return peak / (self.files_mb + self.kv_cache_mb)

    def as_dict(self) -> dict:
        return {**asdict(self), "rss_ratio": self.rss_ratio}


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM of this process in MB (10^6 bytes) (since the last reset), or -1 where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return -1.0


def max_rss_mb() -> float:
    scale = 1024 / 1e6 if platform.system() != "Darwin" else 1 / 1e6  # kB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def bench(model: str | Path, *, prompt_len: int = 128, gen: int = 64, threads: int | None = None,
          provider: str = "auto", warmup: int = 1, seed: int = 0, verify: bool = True,
          batch: int = 1, P: int | None = None, spin: bool | None = None) -> BenchResult:  # noqa: N803
    """Load the export, warm up, then time one greedy generation from a random prompt of `prompt_len` ids.

    With `batch` B > 1, B random prompts of `prompt_len` ids (the first is batch 1's prompt) generate together.
    `P`: the streams to run a multi-P export at (default: the manifest's P, its largest).

    `threads` is clamped to the CPUs available (the result records the count used); `verify` and
    `spin`: see `Model.load`.
    """
    return bench_streams(model, None if P is None else [P], prompt_len=prompt_len, gen=gen, threads=threads,
                         provider=provider, warmup=warmup, seed=seed, verify=verify, batch=batch, spin=spin)[0]


def bench_streams(
    model: str | Path, Ps: Sequence[int] | None, *, prompt_len: int = 128, gen: int = 64,  # noqa: N803
    threads: int | None = None, provider: str = "auto", warmup: int = 1, seed: int = 0, verify: bool = True,
    batch: int = 1, spin: bool | None = None,
) -> list[BenchResult]:
    """`bench` at each P of `Ps` (None: the manifest's P) from one process and one loaded export, in order.

    Each P's peak RSS while generating is the process's high-water mark since that P's run began, so it
    includes what the earlier P left allocated: for a multi-P export, the memory of serving them all.
    """
    check_int(prompt_len, "--prompt-len", minimum=1)
    check_int(gen, "--gen", minimum=1)
    check_int(batch, "--batch", minimum=1)
    threads = check_threads(threads)
    t0 = time.perf_counter()
    m = Model.load(model, provider=provider, threads=threads, verify=verify, spin=spin)
    check_generation(prompt_len, gen, m.context_length, "--gen")
    for p in Ps or [m.P]:
        check_cache_fits(m.info.at(m.check_streams(p)), batch, prompt_len + gen)  # before the prompts are made
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, m.vocab_size, size=prompt_len).tolist() for _ in range(batch)]
    ids: list[int] | list[list[int]] = prompts[0] if batch == 1 else prompts
    return [dataclasses.replace(_measure(m, str(model), P, ids, prompt_len=prompt_len, gen=gen, threads=threads,
                                         warmup=warmup, batch=batch, load_s=load_s),
                                spin=SPIN_DEFAULT if spin is None else spin) for P in (Ps or [m.P])]


def _measure(m: Model, model: str, P: int, ids: list[int] | list[list[int]], *, prompt_len: int, gen: int,  # noqa: N803
             threads: int | None, warmup: int, batch: int, load_s: float) -> BenchResult:
    for _ in range(warmup):  # first runs pay one-off kernel and allocator setup
        m.generate(prompt_ids=ids, max_new_tokens=min(gen, 4), ignore_eos=True, P=P)
    hwm = reset_peak_rss()
    r = m.generate(prompt_ids=ids, max_new_tokens=gen, ignore_eos=True, P=P)
    t = (r[0] if isinstance(r, list) else r).timings  # one Timings for the whole batch
    info = m.info.at(P)
    kv_bytes = (batch * 2 * info.num_layers * info.cache_heads * info.head_dim
                * (prompt_len + gen) * np.dtype(info.cache_dtype).itemsize)
    files = m.manifest.total_bytes
    return BenchResult(
        model=model, P=P, dtype=m.manifest.dtype,
        quantization=_quant_name(m.manifest.quantization), provider=m.provider,
        threads=threads, prompt_len=prompt_len, gen=gen, load_s=load_s,
        time_to_first_token_s=t.time_to_first_token_s, prefill_tokens_per_s=t.prefill_tokens_per_s,
        decode_ms_per_token=t.decode_ms_per_token, peak_rss_mb=max_rss_mb(),
        generate_peak_rss_mb=peak_rss_mb() if hwm else -1.0, files_mb=files / 1e6,
        kv_cache_mb=kv_bytes / 1e6, batch=batch,
    )


def _quant_name(q: object) -> str | None:
    if q is None or isinstance(q, str):
        return q
    if isinstance(q, dict):
        scheme = q.get("scheme", q)
        bits = scheme.get("bits") if isinstance(scheme, dict) else None
        return f"int{bits}" if bits else "quantized"
    return str(q)
