"""How closely one export follows another: top-1 agreement, KL divergence and perplexity.

Both exports run on identical token windows (teacher forcing): each window is prefilled except
its last `decode_steps` tokens, which are then fed one at a time through the KV cache, so both the
prefill and the cached decode path are measured. At every position, with p = softmax of the
reference's logits (A) and q = the candidate's (B):

- top-1 agreement: argmax p == argmax q;
- KL(p || q) = sum p (log p - log q), in nats, averaged over positions;
- perplexity of each: exp(mean negative log-likelihood of the next token), when the stream is text.

Torch-free: numpy, onnxruntime and tokenizers only, so it runs wherever the runtime does.
"""

from __future__ import annotations

import gc
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from parscale import contract
from parscale.errors import ParScaleError
from parscale.manifest import MODEL_FILE

EOS_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Fidelity:
    """B measured against the reference A on the same token windows."""

    positions: int  # positions compared (windows x window length)
    windows: int
    window: int
    decode_steps: int  # per window, positions produced through the KV cache
    top1_agreement: float
    mean_kl: float  # nats, KL(p_A || p_B) averaged over positions
    max_kl: float
    perplexity_a: float | None  # None when the tokens are not text
    perplexity_b: float | None
    source: str  # what the tokens were

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def text_tokens(folder: str | Path, text_path: str | Path) -> np.ndarray:
    """The tokens of a UTF-8 text file with the folder's tokenizer.json, after one EOS as context.

    The leading EOS is the document boundary the model saw in training, so the first real token
    is predicted from a familiar context.
    """
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ParScaleError(f"{path} not found: scoring a text file needs the export's tokenizer.json")
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ParScaleError(f"cannot read {text_path} as UTF-8 text: {e}") from None
    tok = Tokenizer.from_file(str(path))
    eos = tok.token_to_id(EOS_TEXT)
    return np.asarray(([eos] if eos is not None else []) + tok.encode(text).ids, dtype=np.int64)


def random_tokens(vocab_size: int, n: int, seed: int = 0) -> np.ndarray:
    """A reproducible uniform token stream, for models without text (random checkpoints)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=n, dtype=np.int64)


def make_windows(tokens: np.ndarray, window: int, max_windows: int | None) -> np.ndarray:
    """Non-overlapping windows (n, window) from the start of the stream; a short tail is dropped."""
    n = len(tokens) // window
    if n == 0:
        raise ParScaleError(f"the token stream has {len(tokens)} tokens, fewer than one window of {window}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * window].reshape(n, window)


class _Runner:
    """Drives one export by the graph contract: full-sequence logits, prefill plus cached steps."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.")) // 2
        past = inputs[contract.past_key(0)]
        self.heads, self.head_dim = past.shape[1], past.shape[3]
        if not isinstance(self.heads, int) or not isinstance(self.head_dim, int):
            raise ParScaleError("the export's cache inputs lack static head dimensions")
        self.cache_dtype = np.float16 if past.type == "tensor(float16)" else np.float32
        self.has_keep = contract.NUM_LOGITS_TO_KEEP in inputs
        self.outputs = contract.output_names(self.num_layers)

    def logits(self, ids: np.ndarray, decode_steps: int) -> np.ndarray:
        """float32 logits (b, s, vocab) for every position of `ids` (b, s)."""
        b, s = ids.shape
        split = s - decode_steps
        if split < 1:
            raise ParScaleError(f"decode_steps ({decode_steps}) must be smaller than the window ({s})")
        empty = np.zeros((b, self.heads, 0, self.head_dim), dtype=self.cache_dtype)
        past = dict.fromkeys(contract.past_names(self.num_layers), empty)
        pieces = []
        for start, stop in [(0, split), *((t, t + 1) for t in range(split, s))]:
            feed = {
                contract.INPUT_IDS: ids[:, start:stop],
                contract.ATTENTION_MASK: np.ones((b, stop), dtype=np.int64),
                contract.POSITION_IDS: np.tile(np.arange(start, stop, dtype=np.int64), (b, 1)),
                **past,
            }
            if self.has_keep:
                feed[contract.NUM_LOGITS_TO_KEEP] = np.array(0, dtype=np.int64)
            out = self.session.run(self.outputs, feed)
            pieces.append(out[0].astype(np.float32))
            past = dict(zip(contract.past_names(self.num_layers), out[1:], strict=True))
        return np.concatenate(pieces, axis=1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_sessions(
    open_a: Callable[[], ort.InferenceSession], open_b: Callable[[], ort.InferenceSession], tokens: np.ndarray, *,
    window: int = 128, max_windows: int | None = 8, decode_steps: int = 8, batch: int = 4, source: str = "tokens",
    text: bool = False,
) -> Fidelity:
    """Run the reference `a` and then `b` on the same windows of `tokens` and measure b against a.

    The sessions are opened one after the other (`open_a`, `open_b` return them): a's logits wait
    on disk while b runs, so two large graphs never need memory at the same time.
    """
    windows = make_windows(tokens, window, max_windows)
    starts = range(0, len(windows), batch)
    agree, kl_sum, kl_max, nll_a, nll_b, count, scored = 0, 0.0, 0.0, 0.0, 0.0, 0, 0
    with tempfile.TemporaryDirectory(prefix="parscale-fidelity-") as spill:
        ra = _Runner(open_a())
        for i in starts:
            np.save(Path(spill) / f"{i}.npy", ra.logits(windows[i:i + batch], decode_steps))
        del ra
        gc.collect()  # let the reference session's memory go before the candidate's is allocated
        rb = _Runner(open_b())
        for i in starts:
            ids = windows[i:i + batch]
            la, lb = np.load(Path(spill) / f"{i}.npy"), rb.logits(ids, decode_steps)
            if la.shape != lb.shape:
                raise ParScaleError(f"the exports disagree on the logits' shape: {la.shape} vs {lb.shape}")
            if not np.isfinite(lb).all():
                raise ParScaleError("the compared export produced non-finite logits")
            for row in range(len(ids)):  # one window at a time: float64 (s, vocab) stays small
                pa, pb = _log_softmax(la[row]), _log_softmax(lb[row])
                kl = (np.exp(pa) * (pa - pb)).sum(-1)
                agree += int((pa.argmax(-1) == pb.argmax(-1)).sum())
                kl_sum += float(kl.sum())
                kl_max = max(kl_max, float(kl.max()))
                count += len(kl)
                targets = ids[row, 1:]
                nll_a -= float(np.take_along_axis(pa[:-1], targets[:, None], -1).sum())
                nll_b -= float(np.take_along_axis(pb[:-1], targets[:, None], -1).sum())
                scored += len(targets)
    return Fidelity(
        positions=count, windows=len(windows), window=window, decode_steps=decode_steps,
        top1_agreement=agree / count, mean_kl=kl_sum / count, max_kl=kl_max,
        perplexity_a=math.exp(nll_a / scored) if text else None,
        perplexity_b=math.exp(nll_b / scored) if text else None, source=source,
    )


def cpu_session(path: str | Path, threads: int | None = None, *, prepack: bool = True) -> ort.InferenceSession:
    """A CPU session with the runtime's options (full graph optimizations, as a deployment would use).

    `prepack=False` leaves the weights where ONNX Runtime mapped them instead of also keeping a
    copy packed for its matrix kernels: the session of a float reference graph then needs memory
    for its weights once, not twice, and computes the same products a little more slowly.
    """
    from parscale.runtime.session import CPU, session_options

    opts = session_options(threads, CPU)
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=[CPU])
    except Exception as e:  # ORT has its own exception types for unreadable or unsupported graphs
        raise ParScaleError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None


def _vocab(session: ort.InferenceSession) -> int:
    vocab = session.get_outputs()[0].shape[-1]
    if not isinstance(vocab, int):
        raise ParScaleError("the export's logits lack a static vocabulary dimension")
    return vocab


def compare_exports(
    a: str | Path, b: str | Path, *, text: str | Path | None = None, window: int = 128,
    max_windows: int | None = 8, decode_steps: int = 8, seed: int = 0, threads: int | None = None,
) -> Fidelity:
    """Compare export folder `b` against the reference folder `a` on a text file or random tokens."""
    a, b = Path(a), Path(b)
    for folder in (a, b):
        if not (folder / MODEL_FILE).is_file():
            raise ParScaleError(f"{folder / MODEL_FILE} not found: not an export folder")
    opened = [cpu_session(a / MODEL_FILE, threads)]  # handed over to compare_sessions, not kept here
    vocab = _vocab(opened[0])
    if text is not None:
        tokens, source = text_tokens(a, text), f"text {Path(text).name}"
    else:
        n = window * (max_windows or 8)
        tokens, source = random_tokens(vocab, n, seed), f"random tokens (seed {seed})"

    def open_b() -> ort.InferenceSession:
        session = cpu_session(b / MODEL_FILE, threads)
        if _vocab(session) != vocab:
            raise ParScaleError(f"the exports have different vocabularies ({vocab} vs {_vocab(session)})")
        return session

    return compare_sessions(opened.pop, open_b, tokens, window=window, max_windows=max_windows,
                            decode_steps=decode_steps, source=source, text=text is not None)
