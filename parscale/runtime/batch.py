"""The generation loop: sequences that decode together, joining between steps and leaving when done.

`DecodeBatch` is the one loop of the runtime. `Model.generate` admits all its prompts at once and
steps until every row has finished (`run_generation`); the server's scheduler
(`parscale.serve.batcher`) admits requests as they arrive, each row with its own sampling settings,
seed, stop strings and token budget (`RowSpec`).

How a row joins a running batch: all rows of a batch hold the same number of token columns in the
cache, because the graph takes one attention-mask length for the whole batch; left padding makes up
the difference. On the CPU a joining row is prefilled alone, at its own length, into a free slot of
the batch's cache buffers, and then moved behind the padding that aligns it with the batch
(`Engine.shift`: the keys turned by RoPE of the move, `parscale.runtime.rotary`), which gives the
cache a prefill behind that padding would have written, prefix rows included. A longer row moves
the batch right instead, and padding every row shares is dropped once it reaches PAD_FREE columns.
Without the rotary base (an export without config.json) the row is prefilled left-padded to the
batch's length instead, so it joins only once its prompt is no longer than the batch, and past a
bound on that padding the batch drains (`fits`).

On the CPU a finished row's slot is freed at once (the last row's cache is moved into it), and the
buffers grow when a joining row needs more tokens than they hold. A device cache (CUDA) is bound
whole: there rows start together only, and finished rows stay, fed and ignored, until the batch
ends (rows arriving meanwhile start the next batch).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from parscale.runtime.engine import Engine
from parscale.runtime.generate import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    PAD_ID,
    GenerationResult,
    Step,
    Timings,
    _RowText,
)
from parscale.runtime.sampling import Sampler, SamplingConfig
from parscale.text import Tokenizer

JOIN, WAIT, DRAIN = "join", "wait", "drain"  # what `DecodeBatch.fits` says of a row that would join
# Without moving cached rows (no rotary base known), a joining row is prefilled over the batch's whole
# length. Up to this much left padding, or this many times the steps the batch still needs at most,
# that beats waiting for the batch to end; beyond it the batch takes no one until it has drained (and
# starts afresh, short). With moved rows, the batch drops padding all its rows share past PAD_FREE.
PAD_FREE = 64
PAD_PER_STEP = 4


@dataclass(frozen=True)
class RowSpec:
    """What one sequence asks for: its prompt ids and the options of `Model.generate` for it alone."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class RowEvent:
    """One new token of one row: its id and the text it completes ('' while unfinished)."""

    row: Row
    token: int
    text: str


class Row:
    """One sequence's decoding state: its sampler, streaming text, generated tokens and finish reason.

    `timings` may be shared by rows admitted together (`Model.generate`'s batch): prefill and each
    decode step then count once for all of them. `tag` is the caller's (an index, a request).
    """

    def __init__(self, spec: RowSpec, *, vocab_size: int, eos_ids: Sequence[int], tokenizer: Tokenizer | None,
                 timings: Timings | None = None, started: float | None = None,
                 rng: np.random.Generator | None = None, tag: object = None) -> None:
        self.spec, self.tag = spec, tag
        self.sampler = Sampler(spec.sampling, vocab_size, 1, rng)
        self.text = _RowText(tokenizer, spec.stop) if tokenizer is not None else None
        self.eos = frozenset() if spec.ignore_eos else frozenset(int(e) for e in eos_ids)
        self.generated: list[int] = []
        self.reason: str | None = None  # FINISH_* once finished
        self.cancelled = False  # set by the caller: the row leaves at the next step, without a result
        self.timings = timings if timings is not None else Timings()
        self.started = time.perf_counter() if started is None else started

    @property
    def done(self) -> bool:
        return self.reason is not None or self.cancelled

    @property
    def remaining(self) -> int:
        """Tokens this row may still generate."""
        return self.spec.max_new_tokens - len(self.generated)

    def accept(self, token: int) -> RowEvent:
        """Record a sampled token; decide whether it ends the row (EOS, a stop string, the budget)."""
        self.generated.append(token)
        piece = ""
        if token in self.eos:
            self.reason = FINISH_EOS
        elif self.text is not None:
            piece, hit = self.text.push(token)
            if hit:
                self.reason = FINISH_STOP
        if self.reason is None and self.remaining == 0:
            self.reason = FINISH_LENGTH
        if self.reason is not None and self.reason != FINISH_STOP and self.text is not None:
            piece += self.text.finish()
        return RowEvent(self, token, piece)

    def result(self) -> GenerationResult:
        if self.reason is None:
            raise RuntimeError("the row has not finished")
        return GenerationResult(generated_ids=self.generated, text=self.text.text if self.text is not None else None,
                                finish_reason=self.reason, prompt_tokens=len(self.spec.prompt), timings=self.timings)


class DecodeBatch:
    """Rows decoding together on one `Engine` (which must not be used elsewhere meanwhile).

    `admit` prefills new rows (the first rows of a batch, or rows joining it) and returns their first
    tokens; `step` runs one decode step of every row and returns their next tokens. Rows leave when
    they finish or are cancelled. `close` releases the cache; a batch left empty releases it itself.
    """

    def __init__(self, engine: Engine, *, slots: int, context_length: int | None = None) -> None:
        self.engine, self.slots, self.context_length = engine, slots, context_length
        self.rows: list[Row] = []  # row i lives in cache slot i
        self.length = 0  # token columns every row has in the cache (left padding included)
        self.capacity = 0  # token columns the buffers hold
        self.mask = np.zeros((slots, 0), dtype=np.int64)
        self.pending = np.zeros(slots, dtype=np.int64)  # each row's last sampled token, fed at the next step
        self.positions = np.zeros(slots, dtype=np.int64)  # each row's next position (its real tokens so far)
        self._bound: tuple[int, int] | None = None

    @property
    def live(self) -> list[Row]:
        """Rows still generating."""
        return [r for r in self.rows if not r.done]

    def fits(self, spec: RowSpec, joining: Sequence[RowSpec] = ()) -> str:
        """JOIN if a row of `spec` can join at the next admit (with the rows of `joining`, admitted with it),
        WAIT if it can once the batch has grown or freed a slot, DRAIN if only once the batch has ended."""
        self._sweep()
        if len(self.rows) + len(joining) >= self.slots:
            return WAIT
        if not self.rows:
            return JOIN
        if not self.engine.rearranges:  # a device cache is bound whole: no prefill into some of its slots
            return DRAIN
        if self.engine.shifts:  # prefilled at its own length, then moved into place: any prompt joins
            new = [spec, *joining]
            length = max(self._used(), *(len(s.prompt) for s in new))
            need = length + max([*(s.max_new_tokens for s in new), *(r.remaining for r in self.live)])
            return DRAIN if self.context_length is not None and need > self.context_length else JOIN
        need = self.length + spec.max_new_tokens
        if self.context_length is not None and need > self.context_length:
            return DRAIN
        pad = self.length - len(spec.prompt)
        if pad < 0:
            return WAIT
        if pad > max(PAD_FREE, PAD_PER_STEP * max(r.remaining for r in self.live)):
            return DRAIN
        return JOIN

    def admit(self, rows: list[Row]) -> list[RowEvent]:
        """Prefill `rows` into free slots and sample their first tokens. Each must `fits` (JOIN).

        With a cache that shifts (`Engine.shifts`: the CPU), each row is prefilled alone at its own
        length and then moved behind the left padding that aligns it with the batch (the batch moves
        right instead when the row is longer); otherwise the rows are prefilled together, left-padded
        to the batch's length (for a new batch, to the longest prompt)."""
        self._sweep()
        if not rows:
            return []
        longest, budget = max(len(r.spec.prompt) for r in rows), max(r.spec.max_new_tokens for r in rows)
        start, stop = len(self.rows), len(self.rows) + len(rows)
        if stop > self.slots:
            raise ValueError(f"{stop} rows do not fit a batch of {self.slots} slots")
        shifts = self.engine.shifts
        if not self.rows:  # a new batch
            self.length = longest
            # A cache bound whole holds just these rows: none can join it later.
            self._reserve(longest + budget, self.slots if self.engine.rearranges else len(rows))
        elif not self.engine.rearranges:
            raise ValueError("rows join a batch on a device cache only when it starts")
        else:
            if shifts:
                self._realign(longest)
            elif longest > self.length:
                raise ValueError(f"a joining prompt of {longest} tokens is longer than the batch ({self.length})")
            need = self.length + max([budget, *(r.remaining for r in self.live)])
            if need > self.capacity:
                self._grow(max(need, min(self.context_length or need, 2 * self.capacity)))
        t0 = time.perf_counter()
        if shifts:  # one row at a time, each at its own length
            first = [t for i, r in enumerate(rows) for t in self._prefill([r], start + i, alone=True)]
        else:
            first = self._prefill(rows, start, alone=False)
        now = time.perf_counter()
        for t in _distinct(r.timings for r in rows):
            t.prefill_s += now - t0
        for r in rows:
            r.timings.prefill_tokens += len(r.spec.prompt)
            r.timings.time_to_first_token_s = now - r.started
        self.rows.extend(rows)
        self.pending[start:stop] = first
        events = [r.accept(token) for r, token in zip(rows, first, strict=True)]
        self._sweep()
        return events

    def _prefill(self, rows: list[Row], start: int, alone: bool) -> list[int]:
        """Run the prompts of `rows` into slots start.. and sample their first tokens: `alone` (one row)
        at its own length, then shifted behind its left padding; else left-padded to the batch's length."""
        L = self.length
        width = len(rows[0].spec.prompt) if alone else L
        stop = start + len(rows)
        ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            p = r.spec.prompt
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
        self._bind(start, stop)
        logits = self.engine.step(ids, mask, positions)
        tokens = []
        for i, r in enumerate(rows):
            r.sampler.observe(ids[i:i + 1], mask[i:i + 1])
            tokens.append(int(r.sampler(logits[i:i + 1])[0]))
            self.positions[start + i] = len(r.spec.prompt)
        self.mask[start:stop] = 0
        self.mask[start:stop, L - width:L] = mask
        if alone and width < L:
            self.engine.shift(start, stop, L - width, width)
        return tokens

    def step(self) -> list[RowEvent]:
        """One decode step of every row: feed each its pending token, sample its next."""
        self._sweep()
        if not self.rows:
            return []
        n, L = len(self.rows), self.length
        if self.capacity <= L:
            raise RuntimeError("the batch outgrew its cache")
        self.mask[:n, L] = 1
        self.length = L + 1
        for i, r in enumerate(self.rows):
            r.sampler.observe(self.pending[i:i + 1, None])
        self._bind(0, n)
        t0 = time.perf_counter()
        logits = self.engine.step(self.pending[:n, None], self.mask[:n, :L + 1], self.positions[:n, None])
        live = [i for i, r in enumerate(self.rows) if not r.done]
        for i in live:
            self.pending[i] = self.rows[i].sampler(logits[i:i + 1])[0]
        dt = time.perf_counter() - t0
        for t in _distinct(self.rows[i].timings for i in live):
            t.decode_s += dt
            t.decode_steps += 1
        self.positions[:n] += 1
        events = [self.rows[i].accept(int(self.pending[i])) for i in live]
        self._sweep()
        return events

    def close(self) -> None:
        """Drop every row and release the cache."""
        self.rows, self.length, self.capacity, self._bound = [], 0, 0, None
        self.engine.release()

    # ------------------------------------------------------------------ slots

    def _reserve(self, tokens: int, slots: int) -> None:
        self.engine.reserve(slots, tokens)
        self.capacity, self._bound = tokens, None
        self.mask = np.zeros((self.slots, tokens), dtype=np.int64)

    def _grow(self, tokens: int) -> None:
        self.engine.grow(tokens, len(self.rows), self.length)
        mask = np.zeros((self.slots, tokens), dtype=np.int64)
        mask[:, :self.capacity] = self.mask
        self.mask, self.capacity, self._bound = mask, tokens, None

    def _bind(self, start: int, stop: int) -> None:
        if self._bound != (start, stop):
            self.engine.use(start, stop)
            self._bound = (start, stop)

    def _used(self) -> int:
        """Token columns the live rows need: the longest row's real tokens (the rest is common padding)."""
        return int(self.positions[:len(self.rows)].max()) if self.rows else 0

    def _realign(self, longest: int) -> None:
        """Move every row's cache so that a joining prompt of `longest` tokens fits: right when it is longer
        than the batch; left, dropping the padding all rows share, once that is PAD_FREE columns or more
        (moving the whole cache costs a few milliseconds per row, so not at every join)."""
        n, used = len(self.rows), self._used()
        if longest > self.length:
            by = longest - self.length
        elif self.length - used >= PAD_FREE:
            by = max(used, longest) - self.length
        else:
            return
        target = self.length + by
        if target > self.capacity:
            self._grow(max(target, 2 * self.capacity))
        first = max(0, -by)  # columns of common padding that drop on the left
        keep = self.length - first
        self.engine.shift(0, n, by, keep, first=first)
        mask = np.zeros_like(self.mask[:n])
        mask[:, first + by:first + by + keep] = self.mask[:n, first:first + keep]
        self.mask[:n] = mask
        self.length, self._bound = target, None

    def _sweep(self) -> None:
        """Free the slots of finished and cancelled rows: the last row moves into each (host cache);
        a device cache keeps them until every row is done. A batch left empty releases its cache."""
        if all(r.done for r in self.rows):
            if self.rows or self.capacity:
                self.close()
            return
        if not self.engine.rearranges:
            return
        i = 0
        while i < len(self.rows):
            if not self.rows[i].done:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self.engine.move(last, i, self.length)
                self.mask[i] = self.mask[last]
                self.pending[i], self.positions[i] = self.pending[last], self.positions[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()


def _distinct(timings: Iterator[Timings] | list[Timings]) -> list[Timings]:
    """Each Timings object once (rows admitted together share one)."""
    seen: dict[int, Timings] = {}
    for t in timings:
        seen.setdefault(id(t), t)
    return list(seen.values())


def run_generation(
    engine: Engine, prompts: list[list[int]], *, max_new_tokens: int, sampling: SamplingConfig,
    eos_ids: Sequence[int], stop: Sequence[str], tokenizer: Tokenizer | None, ignore_eos: bool,
    started: float | None = None,
) -> Iterator[Step]:
    """`Model.generate`'s loop: every prompt admitted at once, a `Step` per new token until all have finished.

    The last step carries the results (one `Timings` shared by the batch). A single prompt samples
    from a generator seeded with `sampling.seed`; in a batch each row has its own, spawned from it.
    The engine's cache is released when the iteration ends, however it ends.
    """
    started = time.perf_counter() if started is None else started
    b = len(prompts)
    seeds = [sampling.seed] if b == 1 else np.random.SeedSequence(sampling.seed).spawn(b)
    timings = Timings()
    spec = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop=tuple(stop), ignore_eos=ignore_eos)
    rows = [Row(RowSpec(prompt=p, **spec), vocab_size=engine.info.vocab_size, eos_ids=eos_ids, tokenizer=tokenizer,
                timings=timings, started=started, rng=np.random.default_rng(seed), tag=i)
            for i, (p, seed) in enumerate(zip(prompts, seeds, strict=True))]
    batch = DecodeBatch(engine, slots=b)
    try:
        events = batch.admit(rows)
        while True:
            tokens: list[int | None] = [None] * b
            pieces = [""] * b
            for e in events:
                tokens[e.row.tag], pieces[e.row.tag] = e.token, e.text  # type: ignore[index]
            if all(r.reason is not None for r in rows):
                yield Step(tokens, pieces, [r.result() for r in rows])
                return
            yield Step(tokens, pieces)
            events = batch.step()
    finally:
        batch.close()
