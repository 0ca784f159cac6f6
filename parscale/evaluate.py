"""Perplexity of a checkpoint (PyTorch) or of an ONNX export (onnxruntime) on a text file.

Both evaluators tokenize the same way (`parscale.text.document_ids`) and score the same windows
(`parscale.scoring.plan_windows`: `window` tokens advancing by `stride`, each token scored once),
so their figures are comparable, and equal `parscale compare`'s perplexity for stride = window.
Windows are independent sequences (positions from 0, empty cache).

This module imports torch only inside `eval_checkpoint`: `eval_export` runs on the runtime's
dependencies alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parscale.args import check_threads, check_window
from parscale.config import ParScaleConfig, Streams
from parscale.errors import ParScaleError
from parscale.scoring import NllFn, plan_windows, score_windows, token_nll
from parscale.text import Tokenizer, check_tokenizer_fits, document_ids, folder_tokenizer, read_text


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
    P: int = 0  # the streams scored (the folder's default when none was asked for)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prepare(
    folder: Path, text_path: str | Path, max_tokens: int | None, vocab_size: int, tokenizer: Tokenizer | None = None,
) -> tuple[np.ndarray, int]:
    """Ids to score, and the UTF-8 bytes the scored ids[1:] spell (exact for byte-level BPE)."""
    tok = check_tokenizer_fits(tokenizer if tokenizer is not None else folder_tokenizer(folder), vocab_size, folder)
    ids = document_ids(folder, read_text(text_path), tok)
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise ParScaleError(f"{text_path} holds too little text to score (need two tokens)")
    n_bytes = len(tok.decode(ids[1:].tolist(), skip_special_tokens=False).encode("utf-8"))
    return ids, n_bytes


def _result(total: float, count: int, n_bytes: int, window: int, stride: int, P: int) -> EvalResult:  # noqa: N803
    nll = total / count
    return EvalResult(
        tokens=count, bytes=n_bytes, nll_per_token=nll, ppl_per_token=math.exp(nll),
        bits_per_byte=total / math.log(2) / max(n_bytes, 1), window=window, stride=stride, P=P,
    )


def eval_checkpoint(
    model_dir: str | Path, text_path: str | Path, *, window: int = 256, stride: int = 128,
    batch_size: int = 8, max_tokens: int | None = None, P: int | None = None,  # noqa: N803
) -> EvalResult:
    """Perplexity of a PyTorch checkpoint folder on a UTF-8 text file (float32 compute).

    `max_tokens` scores only the first that many tokens (a quick estimate on a long text).
    `P`: one of the folder's head sets (`parscale.modeling.heads`; default its own parscale_n).
    """
    import torch

    from parscale.modeling.heads import load_streams, resolve_streams

    model_dir = Path(model_dir)
    cfg = ParScaleConfig.load(model_dir)
    check_window(window, cfg.max_position_embeddings)  # the same rule as compare, bench and generate
    ids, n_bytes = _prepare(model_dir, text_path, max_tokens, cfg.vocab_size)
    stream = resolve_streams([model_dir], None if P is None else Streams.parse(P))[0]
    _, model = load_streams([stream], torch.float32)[stream.P]
    total, count = score_windows(torch_nll_fn(model), ids, plan_windows(len(ids), window, stride), batch_size)
    return _result(total, count, n_bytes, window, stride, stream.P)


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


def onnx_nll_fn(session: Any, P: int | None = None) -> NllFn:  # noqa: N803
    """Per-token NLL of an ONNX export driven by onnxruntime (`parscale.driver.step`), at `P` for a multi-P export."""
    from parscale.driver import GraphInfo, step

    info = GraphInfo.of(session).at(P)

    def nll(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        b, m = inputs.shape
        positions = np.broadcast_to(np.arange(m, dtype=np.int64), (b, m))
        logits, _ = step(session, info, inputs, np.ones((b, m), dtype=np.int64), positions)
        return token_nll(logits, targets)

    return nll


def eval_export(
    export_dir: str | Path, text_path: str | Path, *, window: int = 256, stride: int = 128,
    batch_size: int = 8, max_tokens: int | None = None, threads: int | None = None,
    P: int | None = None, verify: bool = True,  # noqa: N803
) -> EvalResult:
    """Perplexity of an ONNX export folder with onnxruntime on the CPU, opened by `ExportFolder.open`
    (`verify`: its checksums and finite weights too).

    Same tokenization and windows as `eval_checkpoint`, so the two results are directly comparable.
    `P`: the streams to run a multi-P export at (default: its largest).
    """
    from parscale.runtime.export_folder import ExportFolder

    folder = ExportFolder.open(export_dir, provider="cpu", threads=check_threads(threads), verify=verify)
    P = folder.manifest.streams.pick(P, str(folder.path))
    check_window(window, folder.manifest.model.max_position_embeddings)
    ids, n_bytes = _prepare(folder.path, text_path, max_tokens, folder.info.vocab_size, folder.tokenizer)
    total, count = score_windows(onnx_nll_fn(folder.session, P), ids, plan_windows(len(ids), window, stride),
                                 batch_size)
    return _result(total, count, n_bytes, window, stride, P)
