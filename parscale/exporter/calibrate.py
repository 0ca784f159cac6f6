"""Calibration for GPTQ: the input statistics X^T X of every quantized projection, from the PyTorch module.

The calibration tokens are, by default, sampled from the float model itself (temperature 1 from
the document-start token): no data set is needed, and measured on the trained default model they
calibrate as well as held-out text of the same length (README: quantization). A text file can be
given instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from parscale.exporter.model import ParScaleForCausalLM

# Projections that read the same tensor share one statistic (and one GPTQ factor).
_SHARED_INPUT = {"self_attn.q_proj": ("self_attn.k_proj", "self_attn.v_proj"), "mlp.gate_proj": ("mlp.up_proj",)}
_OWN_INPUT = ("self_attn.o_proj", "mlp.down_proj")
SMALL_MODEL = 100_000_000  # parameters; below this, sampling runs on one thread


def sample_with_hessians(
    model: ParScaleForCausalLM, *, sequences: int = 16, length: int = 128, seed: int = 0, start_id: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sample (sequences, length) tokens from `model` (temperature 1, from `start_id`) and collect the
    projections' input statistics on the way.

    With a causal model and a KV cache, the activations of each sampled token are the ones a
    forward pass over the finished sequences would produce, so no second pass is needed.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((sequences, 1), start_id, dtype=torch.int64)
    out = [ids]
    threads = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        # One-token steps of a small model are all overhead: with 2 threads on a busy 2-core machine
        # a step took 560 ms, with 1 thread 12-39 ms (the OpenMP workers wait for cores).
        torch.set_num_threads(1)
    with _collect(model) as stats, torch.no_grad(), _restore_threads(threads):
        logits, cache = model(ids)
        for _ in range(length - 1):
            nxt = torch.multinomial(torch.softmax(logits[:, -1].float(), dim=-1), 1, generator=gen)
            out.append(nxt)
            if len(out) < length:  # the last token's activations are never used to predict anything
                logits, cache = model(nxt, None, None, cache)
    return torch.cat(out, dim=1).numpy(), stats.result()


@contextlib.contextmanager
def _restore_threads(threads: int) -> Iterator[None]:
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def text_windows(model_dir: Path, text_path: str | Path, *, sequences: int = 16, length: int = 128,
                 seed: int = 0) -> np.ndarray:
    """(sequences, length) windows at random offsets of a text file, tokenized by the checkpoint's tokenizer."""
    from parscale.fidelity import text_tokens

    tokens = text_tokens(model_dir, text_path)
    if len(tokens) < length:
        from parscale.errors import ParScaleError

        raise ParScaleError(f"{text_path} has {len(tokens)} tokens, fewer than one calibration window ({length})")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length + 1, size=sequences)
    return np.stack([tokens[s:s + length] for s in starts])


def input_hessians(model: ParScaleForCausalLM, tokens: np.ndarray, batch: int = 4) -> dict[str, np.ndarray]:
    """X^T X (float32, (K, K)) of the inputs of every projection and of the LM head over `tokens`.

    Keys are module paths as in the checkpoint (`model.layers.0.self_attn.q_proj`, `lm_head`);
    projections reading the same input share one array. With P streams every stream's rows count.
    """
    with _collect(model) as stats, torch.no_grad():
        for i in range(0, len(tokens), batch):
            model(torch.from_numpy(np.ascontiguousarray(tokens[i:i + batch])))
    return stats.result()


class _collect:  # noqa: N801 - used as a context manager, like a function
    """Forward hooks that accumulate X^T X of each projection's (and the LM head's) input."""

    def __init__(self, model: ParScaleForCausalLM) -> None:
        self.model = model
        self.sums: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {"lm_head": "lm_head"}  # module path -> path of its statistic
        self.hooked: list[tuple[nn.Module, str]] = [(model.lm_head, "lm_head")]
        for i, layer in enumerate(model.model.layers):
            pre = f"model.layers.{i}."
            for first, others in _SHARED_INPUT.items():
                self.source.update({pre + first: pre + first, **{pre + o: pre + first for o in others}})
            self.source.update({pre + o: pre + o for o in _OWN_INPUT})
            self.hooked += [(layer.get_submodule(n), pre + n) for n in (*_SHARED_INPUT, *_OWN_INPUT)]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def accumulate(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if name in self.sums:
                self.sums[name] += x.T @ x
            else:
                self.sums[name] = x.T @ x
        return accumulate

    def __enter__(self) -> _collect:
        self.handles = [m.register_forward_hook(self._hook(n)) for m, n in self.hooked]
        return self

    def __exit__(self, *_exc: object) -> None:
        for h in self.handles:
            h.remove()

    def result(self) -> dict[str, np.ndarray]:
        arrays = {name: t.numpy() for name, t in self.sums.items()}
        return {path: arrays[src] for path, src in self.source.items()}
