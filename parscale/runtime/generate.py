"""The generation loop: left-padded prefill, cached decode steps, stopping, streaming text, timings."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from parscale.runtime.sampling import Sampler
from parscale.runtime.session import Engine
from parscale.text import IncrementalDecoder, Tokenizer

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
PAD_ID = 0  # any in-vocabulary id: padded positions are masked out and never attended to


@dataclass
class Timings:
    """Wall-clock figures of one generation call (shared by all rows of a batch)."""

    time_to_first_token_s: float = 0.0  # from the call (tokenization included) to the first token
    prefill_s: float = 0.0
    prefill_tokens: int = 0  # real prompt tokens, summed over the batch
    decode_s: float = 0.0
    decode_steps: int = 0  # graph runs after prefill (one new token per row each)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_ms_per_token": self.decode_ms_per_token}


@dataclass
class GenerationResult:
    """One sequence's output. `generated_ids` holds the new tokens only (a final EOS included)."""

    generated_ids: list[int]
    text: str | None  # None when the export has no tokenizer; stop strings are cut off
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)

    def as_dict(self) -> dict:
        return {"generated_ids": self.generated_ids, "text": self.text, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "timings": self.timings.as_dict()}


class _RowText:
    """Streaming text of one row: incremental detokenization plus stop-string detection.

    Text that could be the start of a stop string is held back until it is decided, so a stream
    never shows a stop string (or a part of one) that the final text does not contain.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""  # emitted so far
        self.held = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to emit, whether a stop string was hit)."""
        return self._release(self.decoder.push(token), final=False)

    def finish(self) -> str:
        return self._release(self.decoder.flush(), final=True)[0]

    def _release(self, piece: str, final: bool) -> tuple[str, bool]:
        pending = self.held + piece
        if not self.stop:
            self.held, self.text = "", self.text + pending
            return pending, False
        # A stop string may start inside text already emitted only if it was held back; search the
        # held text plus the new piece.
        cut = min((i for i in (pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.text = "", self.text + pending[:cut]
            return pending[:cut], True
        keep = 0 if final else max((_overlap(pending, s) for s in self.stop), default=0)
        out, self.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out, False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a streamed call (`Model.stream_tokens`).

    The last event of a call (and only that one) carries the call's `GenerationResult`.
    """

    token_id: int
    text: str  # text this token completes: '' while a character or a possible stop string is unfinished
    result: GenerationResult | None = None


@dataclass(frozen=True)
class Step:
    """One step of a (batched) generation: the new token and text piece of every row."""

    tokens: list[int | None]  # None for rows that finished at an earlier step
    pieces: list[str]  # '' where nothing new is ready
    results: list[GenerationResult] | None = None  # one per prompt, on the last step only


def run_generation(
    engine: Engine, prompts: list[list[int]], *, max_new_tokens: int, sampler: Sampler,
    eos_ids: Sequence[int], stop: Sequence[str], tokenizer: Tokenizer | None, ignore_eos: bool,
    started: float | None = None,
) -> Iterator[Step]:
    """Run one generation on `engine` (which must not be in use elsewhere); yield a `Step` per new token.

    The last step carries the results. Rows that finish early keep being fed (their outputs
    ignored) until every row has finished, so shapes stay rectangular. The engine's cache is
    released when the iteration ends, however it ends.
    """
    started = time.perf_counter() if started is None else started
    eos = frozenset() if ignore_eos else frozenset(int(e) for e in eos_ids)
    texts = [_RowText(tokenizer, stop) for _ in prompts] if tokenizer else None
    try:
        yield from _steps(engine, prompts, max_new_tokens, sampler, eos, texts, started)
    finally:
        engine.release()


def _steps(engine: Engine, prompts: list[list[int]], max_new_tokens: int, sampler: Sampler,
           eos: frozenset[int], texts: list[_RowText] | None, started: float) -> Iterator[Step]:
    b, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    ids = np.full((b, longest), PAD_ID, dtype=np.int64)
    mask = np.zeros((b, total), dtype=np.int64)  # grows by one column per step, preallocated
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = p
        mask[i, longest - len(p):longest] = 1
    n_real = mask.sum(axis=1, keepdims=True)  # (b, 1): position of each row's next token
    pos = np.clip(mask[:, :longest].cumsum(axis=1) - 1, 0, None)
    sampler.observe(ids, mask[:, :longest])
    t = Timings(prefill_tokens=int(n_real.sum()))

    engine.reset(b, total)
    t0 = time.perf_counter()
    token = sampler(engine.step(ids, mask[:, :longest], pos))
    t.prefill_s = time.perf_counter() - t0
    t.time_to_first_token_s = time.perf_counter() - started

    generated: list[list[int]] = [[] for _ in range(b)]
    reason: list[str | None] = [None] * b
    length = longest
    for step in range(max_new_tokens):
        pieces = [""] * b
        tokens: list[int | None] = [None] * b
        for i in range(b):
            if reason[i] is not None:
                continue
            tok = tokens[i] = int(token[i])
            generated[i].append(tok)
            if tok in eos:
                reason[i] = FINISH_EOS
            elif texts is not None:
                pieces[i], hit = texts[i].push(tok)
                if hit:
                    reason[i] = FINISH_STOP
            if reason[i] is None and step == max_new_tokens - 1:
                reason[i] = FINISH_LENGTH
            if reason[i] is not None and reason[i] != FINISH_STOP and texts is not None:
                pieces[i] += texts[i].finish()
        if all(r is not None for r in reason):
            # Every decode step has run, so the timings are final when the results are made.
            results = [
                GenerationResult(generated_ids=generated[i], text=texts[i].text if texts is not None else None,
                                 finish_reason=str(reason[i]), prompt_tokens=len(prompts[i]), timings=t)
                for i in range(b)
            ]
            yield Step(tokens, pieces, results)
            return
        yield Step(tokens, pieces)
        sampler.observe(token[:, None])
        mask[:, length] = 1
        length += 1
        t0 = time.perf_counter()
        logits = engine.step(token[:, None], mask[:, :length], n_real)
        token = sampler(logits)
        t.decode_s += time.perf_counter() - t0
        t.decode_steps += 1
        n_real = n_real + 1
