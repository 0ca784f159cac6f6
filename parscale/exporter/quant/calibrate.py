"""Calibration for GPTQ: the input statistics X^T X of every quantized projection, from the PyTorch module.

The calibration tokens are, by default, sampled from the model itself (temperature 1 from
the document-start token): no data set is needed, and measured on the trained default model they
calibrate as well as held-out text of the same length (README: quantization). A text file can be
given instead.

The statistics are computed one decoder layer at a time (`LayerwiseHessians`), in the order the
quantizer asks for them: the hidden states of the calibration tokens are carried from layer to
layer, so only one layer's statistics exist at once (the down_proj statistic alone is 485 MB per
layer at 3B, 17 GB for all layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import blas
from torch import nn

from parscale.errors import ParScaleError
from parscale.modeling.checkpoint import load_model, release, stored_dtype
from parscale.modeling.model import (
    PROJECTION_INPUTS,
    PROJECTIONS,
    ParScaleForCausalLM,
    aggregate_streams,
    attention_bias,
    fold_streams,
    rope_cos_sin,
)
from parscale.text import document_ids, load_eos_ids, read_text

SMALL_MODEL = 100_000_000  # parameters; below this, sampling runs on one thread


def sample_tokens(
    model: ParScaleForCausalLM, *, sequences: int = 16, length: int = 128, seed: int = 0, start_id: int = 0,
) -> np.ndarray:
    """Sample (sequences, length) tokens from `model` at temperature 1, each sequence from `start_id`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((sequences, 1), start_id, dtype=torch.int64)
    out = [ids]
    threads = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        # One-token steps of a small model are all overhead: with 2 threads on a busy 2-core machine
        # a step took 560 ms, with 1 thread 12-39 ms (the OpenMP workers wait for cores).
        torch.set_num_threads(1)
    with torch.no_grad(), _restore_threads(threads):
        logits, cache = model(ids)
        for _ in range(length - 1):
            nxt = torch.multinomial(torch.softmax(logits[:, -1].float(), dim=-1), 1, generator=gen)
            out.append(nxt)
            if len(out) < length:
                logits, cache = model(nxt, None, None, cache)
    return torch.cat(out, dim=1).numpy()


@contextlib.contextmanager
def _restore_threads(threads: int) -> Iterator[None]:
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def calibration_tokens(model_dir: Path, text: str | Path | None) -> tuple[np.ndarray, str]:
    """GPTQ's calibration tokens, and where they came from: windows of a text file, or model samples.

    Samples come from the checkpoint loaded on its own, in `sampling_dtype` (before the export
    loads its float32 copy, so that only one copy is in memory).
    """
    if text is not None:
        tokens = text_windows(model_dir, text)
        return tokens, f"text {Path(text).name}: {tokens.shape[0]} x {tokens.shape[1]} tokens"
    dtype = sampling_dtype(model_dir)
    cfg, model = load_model(model_dir, dtype)
    start = cfg.bos_token_id if cfg.bos_token_id is not None else (load_eos_ids(model_dir, config=cfg) or [0])[0]
    tokens = sample_tokens(model, start_id=start)
    release(model)
    # The last sampled token's activations never predict anything: they are left out.
    return tokens[:, :-1], (f"sampled from the model ({str(dtype).removeprefix('torch.')}): "
                            f"{tokens.shape[0]} x {tokens.shape[1]} tokens (seed 0)")


def sampling_dtype(model_dir: Path) -> torch.dtype:
    """bfloat16 for a checkpoint stored in bfloat16 on a CPU with bfloat16 matrix units, else float32.

    Sampling is token-by-token decoding of the whole model: at 3B it took 608 s in float32. The
    published checkpoints are bfloat16, so sampling in bfloat16 draws from the published model
    itself, and on AVX512-BF16 a (64 x 2048) x (2048 x 11008) product took 8 ms against 28.
    """
    if stored_dtype(model_dir) == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def text_windows(model_dir: Path, text_path: str | Path, *, sequences: int = 16, length: int = 128,
                 seed: int = 0) -> np.ndarray:
    """(sequences, length) windows at random offsets of a text file, tokenized by the checkpoint's tokenizer."""
    tokens = document_ids(model_dir, read_text(text_path))
    if len(tokens) < length:
        raise ParScaleError(f"{text_path} has {len(tokens)} tokens, fewer than one calibration window ({length})")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length + 1, size=sequences)
    return np.stack([tokens[s:s + length] for s in starts])


class LayerwiseHessians(Mapping):
    """X^T X (float32, (K, K)) of the inputs of every projection and of the LM head over `tokens`.

    Only the upper triangle is filled: the matrix is symmetric, and GPTQ's factor reads no more
    (filling the lower one cost 11 % of a 3B int4 export).

    A read-only mapping keyed by module path as in the checkpoint (`model.layers.0.self_attn.q_proj`,
    `lm_head`); projections that read the same input share one array. With P streams every
    stream's rows count. Layers must be asked for in order (a quantizer walks the graph that way);
    only the current layer's statistics are kept. With `consume`, each layer's weights are freed
    once the hidden states have passed it: the module is unusable afterwards, but its memory goes
    back while the quantized graph grows.
    """

    def __init__(self, model: ParScaleForCausalLM, tokens: np.ndarray, *, batch: int = 4,
                 consume: bool = False) -> None:
        cfg = model.cfg
        self.model, self.consume, self.batch = model, consume, batch
        self.ids = torch.from_numpy(np.ascontiguousarray(tokens))
        b, s = min(batch, len(self.ids)), self.ids.shape[1]
        self.cos, self.sin = rope_cos_sin(torch.arange(s).repeat(b, 1), cfg.head_dim, cfg.rope_theta)
        self.bias = attention_bias(torch.ones(b, s, dtype=torch.int64), s, torch.float32)
        self._start()
        self._layer_of = {f"model.layers.{i}.{n}": i for i in range(cfg.num_hidden_layers) for n in PROJECTIONS}
        self._layer_of["lm_head"] = cfg.num_hidden_layers

    def _start(self) -> None:
        with torch.no_grad():  # hidden states, one (P*b, s, h) chunk per `batch` sequences
            self.hidden = [fold_streams(self.model.model.embed_tokens(self.ids[i:i + self.batch]), self.model.cfg.P)
                           for i in range(0, len(self.ids), self.batch)]
        self.layer = -1  # the layer whose statistics `self.stats` holds; num_layers: the LM head's
        self.stats: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._layer_of)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layer_of)

    def __getitem__(self, path: str) -> np.ndarray:
        target = self._layer_of[path]
        if target < self.layer:
            if self.consume:
                raise ParScaleError(f"calibration statistics were asked for {path} after layer {self.layer}: "
                                    "layers must be quantized in order")
            self._start()  # the module is intact: start again from the embeddings
        while self.layer < target:
            self._advance()
        return self.stats[path]

    def _advance(self) -> None:
        """Compute the next layer's statistics, moving the hidden states through the current layer."""
        model, n = self.model, self.model.cfg.num_hidden_layers
        self.stats = {}  # free the previous layer's statistics first
        nxt = self.layer + 1
        with torch.no_grad():
            if nxt < n:
                layer = model.model.layers[nxt]
                with _collect(layer, f"model.layers.{nxt}.") as stats:
                    for i, x in enumerate(self.hidden):
                        b = x.shape[0] // model.cfg.P
                        past = (x.new_zeros(b, model.cfg.cache_heads, 0, model.cfg.head_dim),) * 2
                        self.hidden[i] = layer(x, self.cos[:b], self.sin[:b], self.bias[:b], past)[0]
                if self.consume:
                    release(layer)  # its weights are done with; the module cannot run again
            else:
                with _collect(model.lm_head, "") as stats:
                    for x in self.hidden:
                        x = model.model.norm(x)
                        if model.cfg.P > 1:
                            x = aggregate_streams(x, model.cfg.P, model.model.aggregate_layer,
                                                  model.cfg.parscale_attn_smooth)
                        model.lm_head(x)
                self.hidden = []
        self.stats = stats.result()
        self.layer = nxt


class _collect:  # noqa: N801 - used as a context manager, like a function
    """Forward hooks that accumulate X^T X of the inputs of a layer's projections (or of the LM head)."""

    def __init__(self, module: nn.Module, prefix: str) -> None:
        self.sums: dict[str, np.ndarray] = {}
        if prefix:  # a decoder layer
            # Projections that read the same tensor share one statistic (and one GPTQ factor).
            self.source = {prefix + p: prefix + first for first, group in PROJECTION_INPUTS.items() for p in group}
            self.hooked = [(module.get_submodule(n), prefix + n) for n in PROJECTION_INPUTS]
        else:  # the LM head
            self.source, self.hooked = {"lm_head": "lm_head"}, [(module, "lm_head")]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def accumulate(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float().contiguous().numpy()  # (rows, K)
            k = x.shape[1]
            acc = self.sums.setdefault(name, np.zeros((k, k), dtype=np.float32, order="F"))
            # X^T X is symmetric: BLAS syrk computes one triangle, half the work of a matrix product
            # (7 s instead of 19 for a 3B down_proj). x.T of a row-major x is column-major: no copy.
            blas.ssyrk(1.0, x.T, beta=1.0, c=acc, trans=0, lower=0, overwrite_c=1)
        return accumulate

    def __enter__(self) -> _collect:
        self.handles = [m.register_forward_hook(self._hook(n)) for m, n in self.hooked]
        return self

    def __exit__(self, *_exc: object) -> None:
        for h in self.handles:
            h.remove()

    def result(self) -> dict[str, np.ndarray]:
        arrays, self.sums = self.sums, {}
        return {path: arrays[src] for path, src in self.source.items()}

