"""Perplexity of a checkpoint (PyTorch) or of an ONNX export (onnxruntime) on a text file.

Both evaluators tokenize the same way and score the same windows, so their figures are comparable:
the text is encoded with the folder's `tokenizer.json`, preceded by the EOS token as context (so
the first real token is scored too, as after a document boundary in training), and cut into
windows of `window` tokens that advance by `stride`; each token is scored exactly once, by the
first window whose prediction of it has not been scored yet, so every scored token after the first
window sees at least `window - stride` tokens of context. Windows are independent sequences
(positions from 0, empty cache).

This module imports torch only inside `eval_checkpoint`: `eval_export` runs on the runtime's
dependencies alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parscale.args import check_threads, check_window
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError

EOS_TEXT = "<|endoftext|>"
NllFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (inputs [b, m], targets [b, m]) -> nll [b, m]


@dataclass(frozen=True)
class Window:
    """Inputs ids[start:start+length] predict ids[start+1:start+length+1]; the first `skip`
    predictions were scored by an earlier window."""

    start: int
    length: int
    skip: int


@dataclass(frozen=True)
class EvalResult:
    """Perplexity figures of one model on one text."""

    tokens: int  # tokens scored (each exactly once)
    bytes: int  # UTF-8 bytes of the text those tokens spell
    nll_per_token: float  # mean negative log-likelihood, nats
    ppl_per_token: float  # exp(nll_per_token)
    bits_per_byte: float  # total NLL in bits / bytes: comparable across tokenizers
    window: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_windows(n_ids: int, window: int, stride: int) -> list[Window]:
    """Windows scoring targets ids[1:n_ids], each once (see the module docstring)."""
    if window < 1 or not 1 <= stride <= window:
        raise ParScaleError(f"need window >= 1 and 1 <= stride <= window, got {window}, {stride}")
    windows: list[Window] = []
    scored_until = 0  # targets ids[1..scored_until] are done
    start = 0
    while scored_until < n_ids - 1:
        end = min(start + window, n_ids - 1)
        windows.append(Window(start, end - start, scored_until - start))
        scored_until = end
        start += stride
    return windows


def score_windows(
    nll_fn: NllFn, ids: np.ndarray, windows: Sequence[Window], batch_size: int = 8
) -> tuple[float, int]:
    """(sum of NLL in nats, tokens scored) over `windows`, batching windows of equal length."""
    total, count = 0.0, 0
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(w.length, []).append(w)
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            inputs = np.stack([ids[w.start:w.start + length] for w in chunk]).astype(np.int64)
            targets = np.stack([ids[w.start + 1:w.start + length + 1] for w in chunk]).astype(np.int64)
            nll = np.asarray(nll_fn(inputs, targets), dtype=np.float64)
            for row, w in zip(nll, chunk, strict=True):
                total += float(row[w.skip:].sum())
                count += length - w.skip
    return total, count


def _tokenizer(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ParScaleError(f"{path} not found: the evaluator needs the folder's tokenizer.json")
    return Tokenizer.from_file(str(path))


def encode_text(tok: Any, text: str, cfg: ParScaleConfig) -> np.ndarray:
    """The ids scored for `text`: a context EOS when the model has one, then the text's tokens."""
    eos = cfg.eos_ids() or [i for i in [tok.token_to_id(EOS_TEXT)] if i is not None]
    # No post-processor tokens (a BOS template, say): the context is chosen here, the same for all.
    return np.asarray(eos[:1] + tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def _prepare(
    model_dir: Path, text_path: str | Path, max_tokens: int | None
) -> tuple[ParScaleConfig, np.ndarray, int]:
    """Config, ids to score, and the UTF-8 bytes the scored ids[1:] spell (exact for byte-level BPE)."""
    cfg = ParScaleConfig.load(model_dir)
    tok = _tokenizer(model_dir)
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ParScaleError(f"cannot read {text_path} as UTF-8 text: {e}") from None
    ids = encode_text(tok, text, cfg)
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise ParScaleError(f"{text_path} holds too little text to score (need two tokens)")
    n_bytes = len(tok.decode(ids[1:].tolist(), skip_special_tokens=False).encode("utf-8"))
    return cfg, ids, n_bytes


def _result(total: float, count: int, n_bytes: int, window: int, stride: int) -> EvalResult:
    nll = total / count
    return EvalResult(
        tokens=count, bytes=n_bytes, nll_per_token=nll, ppl_per_token=math.exp(nll),
        bits_per_byte=total / math.log(2) / max(n_bytes, 1), window=window, stride=stride,
    )


def _check_window(cfg: ParScaleConfig, window: int) -> None:
    check_window(window, cfg.max_position_embeddings)  # the same rule as compare, bench and generate


def eval_checkpoint(
    model_dir: str | Path, text_path: str | Path, *, window: int = 256, stride: int = 128,
    batch_size: int = 8, max_tokens: int | None = None,
) -> EvalResult:
    """Perplexity of a PyTorch checkpoint folder on a UTF-8 text file (float32 compute).

    `max_tokens` scores only the first that many tokens (a quick estimate on a long text).
    """
    import torch

    from parscale.modeling.checkpoint import load_model

    model_dir = Path(model_dir)
    cfg, ids, n_bytes = _prepare(model_dir, text_path, max_tokens)
    _check_window(cfg, window)
    _, model = load_model(model_dir, torch.float32)
    total, count = score_windows(torch_nll_fn(model), ids, plan_windows(len(ids), window, stride), batch_size)
    return _result(total, count, n_bytes, window, stride)


def torch_nll_fn(model: Any) -> NllFn:
    """Per-token NLL of a `ParScaleForCausalLM` (no grad), in the evaluators' calling convention."""
    import torch
    import torch.nn.functional as F

    def nll(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(inputs))
            out = F.cross_entropy(
                logits.float().transpose(1, 2), torch.from_numpy(targets), reduction="none"
            )
        return out.double().numpy()

    return nll


def onnx_nll_fn(session: Any, cfg: ParScaleConfig) -> NllFn:
    """Per-token NLL of an ONNX export driven by onnxruntime (`parscale.contract` names)."""
    from parscale import contract

    names = {i.name: i for i in session.get_inputs()}
    past_type = names[contract.past_key(0)].type if contract.past_key(0) in names else "tensor(float)"
    past_dtype = np.float16 if past_type == "tensor(float16)" else np.float32  # an fp16 export's cache

    def nll(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        b, m = inputs.shape
        feed: dict[str, np.ndarray] = {
            contract.INPUT_IDS: inputs,
            contract.ATTENTION_MASK: np.ones((b, m), dtype=np.int64),
            contract.POSITION_IDS: np.broadcast_to(np.arange(m, dtype=np.int64), (b, m)).copy(),
        }
        empty = np.zeros((b, cfg.cache_heads, 0, cfg.head_dim), dtype=past_dtype)
        for name in contract.past_names(cfg.num_hidden_layers):
            feed[name] = empty
        if contract.NUM_LOGITS_TO_KEEP in names:
            feed[contract.NUM_LOGITS_TO_KEEP] = np.array(0, dtype=np.int64)
        (logits,) = session.run([contract.LOGITS], feed)
        logits = logits.astype(np.float64)
        peak = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
        return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]

    return nll


def eval_export(
    export_dir: str | Path, text_path: str | Path, *, window: int = 256, stride: int = 128,
    batch_size: int = 8, max_tokens: int | None = None, threads: int | None = None,
) -> EvalResult:
    """Perplexity of an ONNX export folder (model.onnx, config.json, tokenizer.json) with onnxruntime.

    Same tokenization and windows as `eval_checkpoint`, so the two results are directly comparable.
    """
    import onnxruntime as ort

    export_dir = Path(export_dir)
    onnx_path = export_dir / "model.onnx"
    if not onnx_path.is_file():
        raise ParScaleError(f"{onnx_path} not found: not an export folder?")
    cfg, ids, n_bytes = _prepare(export_dir, text_path, max_tokens)
    _check_window(cfg, window)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: graph-optimisation notices are not the user's concern
    threads = check_threads(threads)
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for corrupt or unreadable files
        raise ParScaleError(f"onnxruntime cannot load {onnx_path}: {str(e).splitlines()[0]}") from None
    total, count = score_windows(onnx_nll_fn(session, cfg), ids, plan_windows(len(ids), window, stride),
                                 batch_size)
    return _result(total, count, n_bytes, window, stride)
