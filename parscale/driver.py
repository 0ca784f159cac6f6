"""Drive an export's graph by the contract: the one session factory, forward step and teacher-forced loop.

Everything that runs an export goes through here: the runtime's Engine (which binds OrtValues but
takes its token inputs and error handling from here), the exporter's validation, fidelity,
evaluation, benchmarks and tests. So session options, provider choice, ORT error wrapping, the cache
dtype and the empty first-step cache are decided in one place. Torch-free: numpy and onnxruntime only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from parscale import contract
from parscale.config import Streams
from parscale.errors import ParScaleError

T = TypeVar("T")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# ONNX type string of the cache inputs -> the numpy dtype of an empty cache fed to them.
CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


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


# Whether idle intra-op workers spin (ONNX Runtime's default) or sleep. Chosen by measurement
# (benchmarks/README.md, "spinning"); `spin=` on Model.load and --spin/--no-spin on the CLI override it.
SPIN_DEFAULT = False


def session_options(threads: int | None, *, prepack: bool = True, spin: bool | None = None) -> ort.SessionOptions:
    """Options chosen by measurement (benchmarks/README.md has the figures).

    - Graph optimizations ALL: ORT fuses RMSNorm (SimplifiedLayerNormalization) and the
      residual adds, and prepacks MatMul weights for MLAS.
    - The CPU arena is off: decode allocates small, varying-size cache tensors every step, and the
      BFC arena rounded them up and kept the peak; plain malloc returns memory and costs no speed.
    - One intra-op pool of `threads` threads (default: ORT's choice, the physical cores); no
      inter-op parallelism, because the graph is one chain of layers.
    - `spin`: idle worker threads spin (ORT's default) or sleep; None takes SPIN_DEFAULT.
    - `prepack=False` leaves the weights where ONNX Runtime mapped them instead of also keeping a
      copy packed for its matrix kernels: a float reference graph then needs memory for its
      weights once, not twice, and computes the same products a little more slowly.
    """
    opts = ort.SessionOptions()
    # Fatal only: ORT logs a failing kernel (ERROR) on stderr before it raises, and we report the raised
    # error as one line; warnings (unused initializers etc.) are not the user's business either.
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False  # shapes change every step: patterns would never be reused
    if threads is not None:
        if threads < 1:
            raise ParScaleError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not (SPIN_DEFAULT if spin is None else spin):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def open_session(
    model_path: str | Path, *, provider: str = CPU, threads: int | None = None, prepack: bool = True,
    spin: bool | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session of `model_path` with `session_options`; a load failure is a ParScaleError.

    `provider` is an ONNX Runtime provider name (`resolve_provider` maps the user's choice); CUDA
    falls back to CPU for the nodes it lacks.
    """
    opts = session_options(threads, prepack=prepack, spin=spin)
    providers = [provider] if provider == CPU else [provider, CPU]
    try:
        return ort.InferenceSession(str(model_path), opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types for corrupt or unreadable files
        raise ParScaleError(f"onnxruntime cannot load {model_path}: {str(e).splitlines()[0]}") from None


def default_threads() -> int | None:
    """PARSCALE_THREADS overrides ORT's default thread count (handy for containers)."""
    value = os.environ.get("PARSCALE_THREADS")
    return int(value) if value and value.isdigit() and int(value) > 0 else None


@dataclass(frozen=True)
class GraphInfo:
    """What driving a graph needs to know, read from the graph itself (the one source)."""

    num_layers: int
    cache_heads: int  # P * num_key_value_heads
    head_dim: int
    vocab_size: int
    cache_dtype: type  # numpy dtype of the cache (float16 for an fp16 export)
    prefix_rows: int | None = None  # cache rows the graph writes before the tokens (None: not recorded)
    streams: Streams | None = None  # the P a graph serving several P runs (None: the graph's one P)
    kv_heads: int = 0  # KV heads per stream, for a graph serving several P

    def at(self, P: int | None) -> GraphInfo:  # noqa: N803
        """This graph driven at P streams: for a graph serving several P, the cache heads of that P
        (None: the largest); a single-P graph has one P, which its manifest states."""
        if self.streams is None or P is None:
            return self
        return dataclasses.replace(self, cache_heads=self.streams.pick(P) * self.kv_heads)

    @classmethod
    def of(cls, session: ort.InferenceSession) -> GraphInfo:
        """Read and check the contract's inputs and outputs of a session's graph."""
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        num_layers = sum(1 for n in inputs if n.startswith(contract.PAST_PREFIX)) // 2
        missing = [n for n in (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS,
                               *contract.past_names(num_layers)) if n not in inputs]
        missing += [n for n in contract.output_names(num_layers) if n not in outputs]
        if num_layers == 0 or missing:
            lacking = ", ".join(missing[:4]) or "cache inputs"
            raise ParScaleError(f"the graph does not follow the parscale contract (not a parscale export?): "
                                f"it lacks {lacking}")
        past = inputs[contract.past_key(0)]
        heads, head_dim, vocab = past.shape[1], past.shape[3], outputs[contract.LOGITS].shape[-1]
        cache = _cache_meta(session)
        streams, kv = cache.get("streams"), cache.get("kv_heads_per_stream")
        multi = isinstance(streams, list) and all(_count(p) for p in streams) and streams and _count(kv)
        if multi:
            heads = max(streams) * kv  # the largest P, unless `at` picks another
        if not all(isinstance(d, int) for d in (heads, head_dim, vocab)):
            raise ParScaleError("the graph's cache heads, head_dim and vocabulary must be static dimensions")
        if past.type not in CACHE_DTYPES:
            raise ParScaleError(f"the graph's cache has type {past.type}; expected float or float16")
        rows = cache.get("prefix_rows")
        return cls(num_layers=num_layers, cache_heads=heads, head_dim=head_dim, vocab_size=vocab,
                   cache_dtype=CACHE_DTYPES[past.type],
                   prefix_rows=rows if _count(rows, minimum=0) else None,
                   streams=Streams(tuple(streams)) if multi else None, kv_heads=kv if multi else 0)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The cache of a first step: every past input with length 0."""
        empty = np.zeros((batch, self.cache_heads, 0, self.head_dim), dtype=self.cache_dtype)
        return dict.fromkeys(contract.past_names(self.num_layers), empty)


def _cache_meta(session: ort.InferenceSession) -> dict[str, Any]:
    """io["cache"] of the manifest recorded in the graph's metadata ({} if absent or malformed)."""
    meta = session.get_modelmeta().custom_metadata_map.get("parscale")
    try:
        cache = json.loads(meta)["io"][contract.CACHE_INFO] if meta else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _count(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def token_inputs(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The contract's three token inputs as the graph takes them (contiguous int64)."""
    return {
        contract.INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64),
        contract.ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype=np.int64),
        contract.POSITION_IDS: np.ascontiguousarray(position_ids, dtype=np.int64),
    }


def run_graph(run: Callable[[], T]) -> T:
    """Call `run` (a session's run or run_with_iobinding) with ONNX Runtime's failures as one ParScaleError.

    ORT raises its own exception types, with a C++ trace after the first line; a damaged graph or
    weights fail here, and the user gets that first line.
    """
    try:
        return run()
    except Exception as e:  # ORT's own exception types
        raise ParScaleError(f"onnxruntime failed running the graph: {str(e).splitlines()[0]}") from None


def step(
    session: ort.InferenceSession, info: GraphInfo, input_ids: np.ndarray, attention_mask: np.ndarray,
    position_ids: np.ndarray, past: dict[str, np.ndarray] | None = None, *, keep: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward call: logits (batch, seq, vocab; the last `keep` positions if keep > 0) and the
    presents, keyed by the past names so that they feed the next step as they are.

    `past` None is the empty cache. Numpy in, numpy out (the Engine binds OrtValues instead).
    """
    feed = {
        **token_inputs(input_ids, attention_mask, position_ids),
        contract.NUM_LOGITS_TO_KEEP: np.array(keep, dtype=np.int64),  # overrides the graph's default (1)
        **(past if past is not None else info.empty_past(len(input_ids))),
    }
    names = [contract.KEPT_LOGITS, *contract.present_names(info.num_layers)]
    out = run_graph(lambda: session.run(names, feed))
    return out[0], dict(zip(contract.past_names(info.num_layers), out[1:], strict=True))


def prefill_decode(
    session: ort.InferenceSession, info: GraphInfo, input_ids: np.ndarray, attention_mask: np.ndarray,
    next_tokens: Iterable[np.ndarray],
) -> Iterator[np.ndarray]:
    """Prefill `input_ids` (batch, s) under `attention_mask` (0 = left padding), then feed each array of
    `next_tokens` (batch, 1) through the cache, one position further each: the one teacher-forced loop.

    Yields the prefill's logits (batch, s, vocab), then each decode step's (batch, 1, vocab).
    """
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, past = step(session, info, input_ids, mask, positions)
    yield logits
    for tokens in next_tokens:
        mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, past = step(session, info, tokens, mask, positions, past, keep=1)
        yield logits
