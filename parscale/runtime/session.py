"""ONNX Runtime session for an export, and the forward step that keeps the KV cache in OrtValues.

The cache never passes through numpy: each step binds the previous step's `present.*` OrtValues
as the next step's `past_key_values.*` (I/O binding), and ONNX Runtime allocates the new presents
on the execution device (on CUDA they never leave the GPU). Only the logits come back to the host,
into one preallocated buffer of shape (batch, 1, vocab), because we always ask for the last
position only (`num_logits_to_keep` = 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from parscale import contract
from parscale.errors import ParScaleError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def resolve_provider(provider: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> an ONNX Runtime provider name that this installation has."""
    available = ort.get_available_providers()
    if provider == "auto":
        return CUDA if CUDA in available else CPU
    if provider == "cpu":
        return CPU
    if provider == "cuda":
        if CUDA not in available:
            raise ParScaleError(
                "provider 'cuda' is not available in this onnxruntime installation "
                f"(it has {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime"
            )
        return CUDA
    raise ParScaleError(f"provider must be auto, cpu or cuda, got {provider!r}")


def session_options(threads: int | None, provider: str) -> ort.SessionOptions:
    """Options chosen by measurement (benchmarks/README.md has the figures).

    - Graph optimizations ALL: ORT fuses RMSNorm (SimplifiedLayerNormalization) and the
      residual adds, and prepacks MatMul weights for MLAS.
    - The CPU arena is off: decode allocates small, varying-size cache tensors every step, and the
      BFC arena rounded them up and kept the peak; plain malloc returns memory and costs no speed.
    - One intra-op pool of `threads` threads (default: ORT's choice, the physical cores); no
      inter-op parallelism, because the graph is one chain of layers.
    - Worker threads do not spin while waiting (PARSCALE_SPIN=1 restores ORT's default).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False  # shapes change every step: patterns would never be reused
    if threads is not None:
        if threads < 1:
            raise ParScaleError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if os.environ.get("PARSCALE_SPIN") != "1":
        # Idle workers sleep instead of spinning: on a loaded machine spinning workers took the cores
        # the busy ones needed (int8 P=1 decode 186 -> 121 ms/token at load 7 on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def create_session(model_path: Path, provider: str, threads: int | None) -> ort.InferenceSession:
    """An InferenceSession for the graph with `session_options`; ParScaleError if ONNX Runtime cannot load it."""
    opts = session_options(threads, provider)
    providers = [provider] if provider == CPU else [provider, CPU]
    try:
        return ort.InferenceSession(str(model_path), opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for corrupt or unreadable files
        raise ParScaleError(f"onnxruntime cannot load {model_path}: {str(e).splitlines()[0]}") from None


@dataclass(frozen=True)
class GraphInfo:
    """What the runtime needs to know about the graph's cache."""

    num_layers: int
    cache_heads: int
    head_dim: int
    vocab_size: int
    cache_dtype: type


class Engine:
    """Runs prefill and decode steps with I/O binding; holds the cache between steps.

    An Engine is one generation's state (its I/O binding, KV cache and logits buffer) and serves
    one call at a time: `Model` makes a new one for every call, so concurrent calls share only the
    session, whose runs are thread-safe with separate bindings.
    """

    def __init__(self, session: ort.InferenceSession, info: GraphInfo, provider: str) -> None:
        self.session, self.info = session, info
        self.device = "cuda" if provider == CUDA else "cpu"
        self.past_names = contract.past_names(info.num_layers)
        self.present_names = contract.present_names(info.num_layers)
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        missing = [n for n in (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS,
                               *self.past_names) if n not in inputs]
        missing += [n for n in (contract.LOGITS, *self.present_names) if n not in outputs]
        if missing:
            raise ParScaleError(f"the graph does not follow the parscale contract: it lacks {', '.join(missing[:4])}")
        self.has_keep = contract.NUM_LOGITS_TO_KEEP in inputs
        self.keep_one = np.array(1, dtype=np.int64)
        self.cache: list[ort.OrtValue] = []
        self.logits = np.empty((0, 1, info.vocab_size), dtype=np.float32)
        self.binding = session.io_binding()

    def reset(self, batch: int) -> None:
        """An empty cache (length 0) for a new batch, and the logits buffer for that batch size."""
        shape = (batch, self.info.cache_heads, 0, self.info.head_dim)
        empty = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.info.cache_dtype, self.device, 0)
        self.cache = [empty] * len(self.past_names)
        if self.logits.shape[0] != batch:
            self.logits = np.empty((batch, 1, self.info.vocab_size), dtype=np.float32)
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)  # shares memory

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run the graph on new tokens; returns last-position logits (batch, vocab), a view reused next step."""
        b = self.binding
        b.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_cpu_input(contract.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        b.bind_cpu_input(contract.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        if self.has_keep:
            b.bind_cpu_input(contract.NUM_LOGITS_TO_KEEP, self.keep_one)
        for name, value in zip(self.past_names, self.cache, strict=True):
            b.bind_ortvalue_input(name, value)
        b.clear_binding_outputs()
        if self.has_keep:
            b.bind_ortvalue_output(contract.LOGITS, self._logits_value)
        else:  # an older graph without the input returns every position: let ORT size the output
            b.bind_output(contract.LOGITS, "cpu")
        for name in self.present_names:
            b.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(b)
        outputs = b.get_outputs()
        # Order of get_outputs() is the binding order: logits, then the presents.
        self.cache = [outputs[i + 1] for i in range(len(self.present_names))]
        logits = self.logits[:, -1] if self.has_keep else outputs[0].numpy()[:, -1]
        if not np.isfinite(logits).all():  # cheap (one row per sequence); NaN would decode as token 0 forever
            raise ParScaleError("the model produced NaN/Inf logits: its weights or inputs are damaged; "
                                "load it with verification on (the default) to find the tensor, or re-export")
        return logits

    def release(self) -> None:
        """Drop the cache (its memory returns to the allocator)."""
        self.cache = []
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()


def default_threads() -> int | None:
    """PARSCALE_THREADS overrides ORT's default thread count (handy for containers)."""
    value = os.environ.get("PARSCALE_THREADS")
    return int(value) if value and value.isdigit() and int(value) > 0 else None
