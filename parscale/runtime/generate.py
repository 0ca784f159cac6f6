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


class Generation:
    """Iterate to run; each item is the list of new text pieces per row ('' when nothing new).

    After iteration `results` holds one `GenerationResult` per prompt. Rows that finish early keep
    being fed (their outputs ignored) until every row has finished, so shapes stay rectangular.
    """

    def __init__(
        self, engine: Engine, prompts: list[list[int]], *, max_new_tokens: int, sampler: Sampler,
        eos_ids: Sequence[int], stop: Sequence[str], tokenizer: Tokenizer | None, ignore_eos: bool,
        started: float | None = None,
    ) -> None:
        self.engine, self.prompts, self.sampler = engine, prompts, sampler
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset() if ignore_eos else frozenset(int(e) for e in eos_ids)
        self.texts = [_RowText(tokenizer, stop) for _ in prompts] if tokenizer else None
        self.started = time.perf_counter() if started is None else started
        self.timings = Timings()
        self.results: list[GenerationResult] = []

    def __iter__(self) -> Iterator[list[str]]:
        try:
            yield from self._run()
        finally:
            self.engine.release()

    def _run(self) -> Iterator[list[str]]:
        b, longest = len(self.prompts), max(len(p) for p in self.prompts)
        total = longest + self.max_new_tokens
        ids = np.full((b, longest), PAD_ID, dtype=np.int64)
        mask = np.zeros((b, total), dtype=np.int64)  # grows by one column per step, preallocated
        for i, p in enumerate(self.prompts):
            ids[i, longest - len(p):] = p
            mask[i, longest - len(p):longest] = 1
        n_real = mask.sum(axis=1, keepdims=True)  # (b, 1): position of each row's next token
        pos = np.clip(mask[:, :longest].cumsum(axis=1) - 1, 0, None)
        self.sampler.observe(ids, mask[:, :longest])
        t = self.timings
        t.prefill_tokens = int(n_real.sum())

        self.engine.reset(b)
        t0 = time.perf_counter()
        token = self.sampler(self.engine.step(ids, mask[:, :longest], pos))
        t.prefill_s = time.perf_counter() - t0
        t.time_to_first_token_s = time.perf_counter() - self.started

        generated: list[list[int]] = [[] for _ in range(b)]
        reason: list[str | None] = [None] * b
        length = longest
        for step in range(self.max_new_tokens):
            pieces = [""] * b
            for i in range(b):
                if reason[i] is not None:
                    continue
                tok = int(token[i])
                generated[i].append(tok)
                if tok in self.eos:
                    reason[i] = FINISH_EOS
                elif self.texts is not None:
                    pieces[i], hit = self.texts[i].push(tok)
                    if hit:
                        reason[i] = FINISH_STOP
                if reason[i] is None and step == self.max_new_tokens - 1:
                    reason[i] = FINISH_LENGTH
                if reason[i] is not None and reason[i] != FINISH_STOP and self.texts is not None:
                    pieces[i] += self.texts[i].finish()
            yield pieces
            if all(r is not None for r in reason):
                break
            self.sampler.observe(token[:, None])
            mask[:, length] = 1
            length += 1
            t0 = time.perf_counter()
            logits = self.engine.step(token[:, None], mask[:, :length], n_real)
            token = self.sampler(logits)
            t.decode_s += time.perf_counter() - t0
            t.decode_steps += 1
            n_real = n_real + 1

        self.results = [
            GenerationResult(
                generated_ids=generated[i],
                text=self.texts[i].text if self.texts is not None else None,
                finish_reason=reason[i] or FINISH_LENGTH,
                prompt_tokens=len(self.prompts[i]),
                timings=t,
            )
            for i in range(b)
        ]
