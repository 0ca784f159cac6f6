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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from parscale.errors import ParScaleError
from parscale.graph import GraphInfo, open_session, step
from parscale.manifest import MODEL_FILE, Manifest
from parscale.scoring import full_windows, kl_divergence, log_softmax, window_arrays
from parscale.text import document_ids, read_text


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
    P_a: int | None = None  # the streams A and B ran at (None: not recorded by the caller)
    P_b: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def text_tokens(folder: str | Path, text_path: str | Path) -> np.ndarray:
    """The ids of a UTF-8 text file as every scorer sees them (`parscale.text.document_ids`)."""
    return document_ids(folder, read_text(text_path))


def random_tokens(vocab_size: int, n: int, seed: int = 0) -> np.ndarray:
    """A reproducible uniform token stream, for models without text (random checkpoints)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=n, dtype=np.int64)


class _Runner:
    """Full-sequence logits of one export: prefill, then the last `decode_steps` tokens through the cache."""

    def __init__(self, session: ort.InferenceSession, P: int | None = None) -> None:  # noqa: N803
        self.session, self.info = session, GraphInfo.of(session).at(P)

    def logits(self, ids: np.ndarray, decode_steps: int) -> np.ndarray:
        """float32 logits (b, s, vocab) for every position of `ids` (b, s)."""
        b, s = ids.shape
        split = s - decode_steps
        if split < 1:
            raise ParScaleError(f"decode_steps ({decode_steps}) must be smaller than the window ({s})")
        past = None
        pieces = []
        for start, stop in [(0, split), *((t, t + 1) for t in range(split, s))]:
            positions = np.tile(np.arange(start, stop, dtype=np.int64), (b, 1))
            logits, past = step(self.session, self.info, ids[:, start:stop], np.ones((b, stop), dtype=np.int64),
                                positions, past)
            pieces.append(logits.astype(np.float32))
        return np.concatenate(pieces, axis=1)


def compare_sessions(
    open_a: Callable[[], ort.InferenceSession], open_b: Callable[[], ort.InferenceSession], tokens: np.ndarray, *,
    window: int = 128, max_windows: int | None = 8, decode_steps: int = 8, batch: int = 4, source: str = "tokens",
    text: bool = False, P: int | tuple[int | None, int | None] | None = None,  # noqa: N803
) -> Fidelity:
    """Run the reference `a` and then `b` on the same windows of `tokens` and measure b against a.

    `P`: the streams to drive graphs serving several P at (None: their largest); a pair (P of a, P of b)
    drives each at its own.

    The sessions are opened one after the other (`open_a`, `open_b` return them): a's logits wait
    on disk while b runs, so two large graphs never need memory at the same time.
    """
    pa_, pb_ = P if isinstance(P, tuple) else (P, P)
    windows = full_windows(len(tokens), window, max_windows)
    starts = range(0, len(windows), batch)
    agree, kl_sum, kl_max, nll_a, nll_b, count = 0, 0.0, 0.0, 0.0, 0.0, 0
    with tempfile.TemporaryDirectory(prefix="parscale-fidelity-") as spill:
        ra = _Runner(open_a(), pa_)
        for i in starts:
            ids, _ = window_arrays(tokens, windows[i:i + batch])
            np.save(Path(spill) / f"{i}.npy", ra.logits(ids, decode_steps))
        del ra
        gc.collect()  # let the reference session's memory go before the candidate's is allocated
        rb = _Runner(open_b(), pb_)
        for i in starts:
            ids, targets = window_arrays(tokens, windows[i:i + batch])
            la, lb = np.load(Path(spill) / f"{i}.npy"), rb.logits(ids, decode_steps)
            if la.shape != lb.shape:
                raise ParScaleError(f"the exports disagree on the logits' shape: {la.shape} vs {lb.shape}")
            if not np.isfinite(lb).all():
                raise ParScaleError("the compared export produced non-finite logits")
            for row in range(len(ids)):  # one window at a time: float64 (s, vocab) stays small
                pa, pb = log_softmax(la[row]), log_softmax(lb[row])
                kl = kl_divergence(pa, pb)
                agree += int((pa.argmax(-1) == pb.argmax(-1)).sum())
                kl_sum += float(kl.sum())
                kl_max = max(kl_max, float(kl.max()))
                count += len(kl)
                nll_a -= float(np.take_along_axis(pa, targets[row][:, None], -1).sum())
                nll_b -= float(np.take_along_axis(pb, targets[row][:, None], -1).sum())
    return Fidelity(
        positions=count, windows=len(windows), window=window, decode_steps=decode_steps,
        top1_agreement=agree / count, mean_kl=kl_sum / count, max_kl=kl_max,
        perplexity_a=math.exp(nll_a / count) if text else None,
        perplexity_b=math.exp(nll_b / count) if text else None, source=source, P_a=pa_, P_b=pb_,
    )


def resolve_pair(P: Any, manifests: tuple[Manifest, Manifest], folders: tuple[Path, Path]) -> tuple[int, int]:  # noqa: N803
    """The P each of two exports runs at: `P` is None (each its default), one P or a pair; each must be
    one its export serves."""
    if P is None:
        wanted: list[Any] = [None, None]
    elif isinstance(P, Sequence) and not isinstance(P, str):
        wanted = list(P)
        if len(wanted) not in (1, 2):
            raise ParScaleError(f"P takes one value for both exports or one for each (two), got {len(wanted)}")
        wanted = wanted * (3 - len(wanted))
    else:
        wanted = [P, P]
    out = []
    for p, manifest, folder in zip(wanted, manifests, folders, strict=True):
        if p is None:
            out.append(manifest.model.P)
            continue
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p not in manifest.streams:
            raise ParScaleError(f"{folder} serves P = {', '.join(map(str, manifest.streams))}; got P={p!r}")
        out.append(int(p))
    return out[0], out[1]


def _vocab(session: ort.InferenceSession) -> int:
    return GraphInfo.of(session).vocab_size


def compare_exports(
    a: str | Path, b: str | Path, *, text: str | Path | None = None, window: int = 128,
    max_windows: int | None = 8, decode_steps: int = 8, seed: int = 0, threads: int | None = None,
    P: int | Sequence[int] | None = None,  # noqa: N803
) -> Fidelity:
    """Compare export folder `b` against the reference folder `a` on a text file or random tokens.

    `P`: the streams to run, one P for both exports or a pair (P of a, P of b); None runs each at its
    default (its largest). The result records the P each ran at (`P_a`, `P_b`)."""
    a, b = Path(a), Path(b)
    for folder in (a, b):
        if not (folder / MODEL_FILE).is_file():
            raise ParScaleError(f"{folder / MODEL_FILE} not found: not an export folder")
    P = resolve_pair(P, (Manifest.read(a), Manifest.read(b)), (a, b))
    opened = [open_session(a / MODEL_FILE, threads=threads)]  # handed over to compare_sessions, not kept here
    vocab = _vocab(opened[0])
    if text is not None:
        tokens, source = text_tokens(a, text), f"text {Path(text).name}"
    else:
        n = window * (max_windows or 8) + 1  # + 1: the last window's last target
        tokens, source = random_tokens(vocab, n, seed), f"random tokens (seed {seed})"

    def open_b() -> ort.InferenceSession:
        session = open_session(b / MODEL_FILE, threads=threads)
        if _vocab(session) != vocab:
            raise ParScaleError(f"the exports have different vocabularies ({vocab} vs {_vocab(session)})")
        return session

    return compare_sessions(opened.pop, open_b, tokens, window=window, max_windows=max_windows,
                            decode_steps=decode_steps, source=source, text=text is not None, P=P)
