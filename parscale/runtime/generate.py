"""What a generation yields: results, timings, token events and steps; streaming text with stop strings.

The loop itself is `parscale.runtime.batch` (`DecodeBatch`, `run_generation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

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
    def decode_ms_per_token(self) -> float | None:
        """None when no decode step ran (one new token: prefill made it): there is nothing to time."""
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else None

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
