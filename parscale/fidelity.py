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

from parscale.args import check_window
from parscale.driver import GraphInfo, prefill_decode
from parscale.errors import ParScaleError
from parscale.manifest import Manifest
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
        s = ids.shape[1]
        split = s - decode_steps
        if split < 1:
            raise ParScaleError(f"decode_steps ({decode_steps}) must be smaller than the window ({s})")
        fed = (ids[:, t:t + 1] for t in range(split, s))
        pieces = prefill_decode(self.session, self.info, ids[:, :split], np.ones_like(ids[:, :split]), fed)
        return np.concatenate([p.astype(np.float32) for p in pieces], axis=1)


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
    a, b = (m.streams.pick(p, str(f)) for p, m, f in zip(wanted, manifests, folders, strict=True))
    return a, b


def fidelity_tokens(folder: str | Path, text: str | Path | None, vocab_size: int, n_random: int,
                    seed: int = 0) -> tuple[np.ndarray, str]:
    """The tokens two graphs are compared on, and what they are: a text file's ids (tokenized as every
    scorer does, with `folder`'s tokenizer), or else `n_random` reproducible random ids."""
    if text is not None:
        return text_tokens(folder, text), f"text {Path(text).name}"
    return random_tokens(vocab_size, n_random, seed), f"random tokens (seed {seed})"


def compare_exports(
    a: str | Path, b: str | Path, *, text: str | Path | None = None, window: int = 128,
    max_windows: int | None = 8, decode_steps: int = 8, seed: int = 0, threads: int | None = None,
    P: int | Sequence[int] | None = None, verify: bool = True,  # noqa: N803
) -> Fidelity:
    """Compare export folder `b` against the reference folder `a` on a text file or random tokens, on the CPU.

    Both are opened by `ExportFolder` (`verify`: their checksums and finite weights too), one after
    the other. `P`: the streams to run, one P for both exports or a pair (P of a, P of b); None runs
    each at its default (its largest). The result records the P each ran at (`P_a`, `P_b`)."""
    from parscale.runtime.export_folder import ExportFolder

    a, b = Path(a), Path(b)
    manifests = ExportFolder.check(a, verify=verify), ExportFolder.check(b, verify=verify)
    P = resolve_pair(P, manifests, (a, b))
    check_window(window, min(m.model.max_position_embeddings for m in manifests))
    vocab = manifests[0].model.vocab_size
    if manifests[1].model.vocab_size != vocab:
        raise ParScaleError(f"the exports have different vocabularies ({vocab} vs {manifests[1].model.vocab_size})")
    tokens, source = fidelity_tokens(a, text, vocab, window * (max_windows or 8) + 1, seed)  # + 1: the last target

    def opener(folder: Path) -> Callable[[], ort.InferenceSession]:  # checked above: not hashed twice
        return lambda: ExportFolder.open(folder, provider="cpu", threads=threads, verify=False).session

    return compare_sessions(opener(a), opener(b), tokens, window=window, max_windows=max_windows,
                            decode_steps=decode_steps, source=source, text=text is not None, P=P)
