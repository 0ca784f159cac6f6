"""What a generation takes and yields: its options; results, timings, token events and steps; streaming
text with stop strings.

The loop itself is `parscale.runtime.batch` (`DecodeBatch`, `run_generation`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from parscale.errors import ParScaleError
from parscale.text import IncrementalDecoder, Tokenizer

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
PAD_ID = 0  # any in-vocabulary id: padded positions are masked out and never attended to


@dataclass(frozen=True)
class GenerationOptions:
    """How one generation call runs: `Model.generate`, `stream` and `stream_tokens` take these fields as
    keywords, or a prepared `options=GenerationOptions(...)` (keywords then override its fields).

    - max_new_tokens: new tokens at most; prompt plus this must fit the context length.
    - greedy / temperature: greedy=True or temperature 0 (the default) take the most likely token, as
      does any temperature below `sampling.MIN_TEMPERATURE` (1e-3, its limit); a larger temperature
      samples, after top_k (0 = off) and top_p (1.0 = off) filtering.
    - repetition_penalty: > 1 discourages tokens already in the prompt or output (1.0 = off); in
      [0.01, 100], else refused.
    - seed: makes sampling reproducible (None: a fresh random state); in a batch each row draws from its
      own generator, spawned from the seed.
    - stop: a string or strings that end generation; they are cut from the text (needs a tokenizer).
    - ignore_eos: keep going past the EOS ids of generation_config.json.
    - P: the parallel streams to run, for a multi-P export (one it serves; default: its largest).

    The values are checked when a call starts (ParScaleError naming the field), not here.
    """

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    ignore_eos: bool = False
    P: int | None = None


_OPTION_NAMES = {f.name for f in dataclasses.fields(GenerationOptions)}
F = TypeVar("F", bound=Callable[..., Any])


def call_options(options: GenerationOptions | None, changes: dict[str, Any], where: str) -> GenerationOptions:
    """The options of one call named `where`: `options` (None: the defaults) with the call's keyword
    `changes`. A keyword that is not an option is a TypeError, as for any function; `options` of another
    type is a ParScaleError."""
    if options is None:
        options = GenerationOptions()
    elif not isinstance(options, GenerationOptions):
        raise ParScaleError(f"options must be a GenerationOptions, got {type(options).__name__}")
    unknown = sorted(set(changes) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}; "
                        f"generation options are: {', '.join(sorted(_OPTION_NAMES))}")
    return dataclasses.replace(options, **changes) if changes else options


def takes_options(method: F) -> F:
    """Give a method `(self, ..., options=None, **kwargs)` the signature `help()` and editors show: its
    own parameters, then every `GenerationOptions` field as a keyword with its default."""
    own = inspect.signature(method)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(GenerationOptions)]
    method.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    return method


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
