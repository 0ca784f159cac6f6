"""The server's scheduler: one worker thread runs the model; requests with the same P decode together.

Requests wait in one queue per P. Before each decode step of a P's batch the worker admits the
waiting requests that fit (`DecodeBatch.fits`): all of them when the batch is new, else those that
can join the running batch at this step (continuous batching; `parscale.runtime.batch` says how a
row joins). A request that would not fit the context beside the running rows (or, on an export
batched with padded prefills, would cost too much padding) makes the batch drain: no one joins until
it has ended, and that request starts the next one. Batches of different P take turns,
one step each. The worker hands every new token to its request's asyncio queue, on the request's
event loop (`call_soon_threadsafe`); ONNX Runtime releases the GIL while a step runs, so the loop
keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from parscale.runtime import Model
from parscale.runtime.batch import DRAIN, JOIN, DecodeBatch, Row, RowEvent, RowSpec
from parscale.runtime.generate import GenerationResult

log = logging.getLogger("parscale.serve")
STATS = ("admitted", "joined_running", "steps", "tokens", "cancelled", "cancelled_waiting", "drains",
         "refused_queue_full")


class QueueFullError(Exception):
    """Too many requests are waiting: answer 503 and ask the client to retry."""


class ShuttingDownError(Exception):
    """The server is stopping and takes no new requests."""


@dataclass(frozen=True)
class Event:
    """What a request learns from the worker: a token, its result (last), or an error (last)."""

    index: int  # which prompt of the request
    token: int | None = None
    text: str = ""
    result: GenerationResult | None = None
    error: str | None = None


@dataclass(eq=False)
class Ticket:
    """One prompt of a request, from submission to its last event (the worker's side of it)."""

    spec: RowSpec
    P: int
    index: int
    queue: asyncio.Queue[Event]
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the request's side; the worker drops the row at its next step
    row: Row | None = None
    joined_running: bool = False  # admitted into a batch that was already decoding

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            self.cancelled = True


class Batcher:
    """Schedules the requests of one `Model`: `submit` from the event loop, `start`/`drain`/`stop` around them."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_queue: int = 64) -> None:
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self._cond = threading.Condition()
        self._waiting: dict[int, collections.deque[Ticket]] = {P: collections.deque() for P in model.streams}
        self._running: dict[int, list[Ticket]] = {P: [] for P in model.streams}
        self._batches: dict[int, DecodeBatch] = {}
        self._draining: set[int] = set()  # P whose batch takes no one until it has ended
        self._closed = False  # no new requests
        self._deadline: float | None = None  # when what still runs is cancelled
        self._thread: threading.Thread | None = None
        # Every key exists from the start, so that a reader copying it meanwhile never sees it change size.
        self.stats = collections.Counter[str](dict.fromkeys(STATS, 0))

    # ------------------------------------------------------------------ the event loop's side

    def submit(self, specs: list[RowSpec], P: int, loop: asyncio.AbstractEventLoop,  # noqa: N803
               queue: asyncio.Queue[Event]) -> list[Ticket]:
        """Queue a request's prompts (all or none); their events arrive on `queue`."""
        tickets = [Ticket(spec, P, i, queue, loop) for i, spec in enumerate(specs)]
        with self._cond:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            waiting = sum(len(q) for q in self._waiting.values())
            if waiting + len(tickets) > self.max_queue:
                self.stats["refused_queue_full"] += 1
                raise QueueFullError(f"{waiting} requests are waiting (at most {self.max_queue})")
            self._waiting[P].extend(tickets)
            self._cond.notify()
        return tickets

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"running": sum(len(t) for t in self._running.values()),
                    "waiting": sum(len(q) for q in self._waiting.values())}

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="parscale-batcher", daemon=True)
        self._thread.start()

    def drain(self, timeout: float) -> None:
        """Take no new requests; let those admitted or waiting finish for `timeout` seconds, then cancel them."""
        with self._cond:
            self._closed = True
            deadline = time.monotonic() + timeout
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._cond.notify()

    def stop(self) -> None:
        """Cancel whatever still runs or waits (each gets an error event) and end the worker."""
        self.drain(0)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ the worker

    def _busy(self) -> bool:
        return any(self._waiting.values()) or any(self._running.values())

    def _work(self) -> None:
        turn = 0
        while True:
            with self._cond:
                while not self._busy() and not self._closed:
                    self._cond.wait()
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._cancel_all("the server is shutting down; the request was cancelled")
                if not self._busy():  # closed, and nothing is left
                    return
                busy = [P for P in self.model.streams if self._waiting[P] or self._running[P]]
            P = busy[turn % len(busy)]  # batches of different P take turns
            turn += 1
            try:
                self._turn(P)
            except Exception as e:  # a failing step fails its batch, not the server
                log.exception("generation failed at P=%d", P)
                self._fail(P, f"generation failed: {e}")

    def _turn(self, P: int) -> None:  # noqa: N803
        """Admit what fits into P's batch, then run one step of it."""
        batch = self._batches.get(P)
        if batch is None:
            engine = self.model.engine(self.model.info.at(P))
            batch = self._batches[P] = DecodeBatch(engine, slots=self.max_batch,
                                                   context_length=self.model.context_length)
        for t in self._running[P]:
            if t.cancelled and t.row is not None and not t.row.done:
                t.row.cancelled = True  # its slot is freed at this step
                self.stats["cancelled"] += 1
        running = bool(batch.live)
        joining: list[Ticket] = []
        with self._cond:
            waiting = self._waiting[P]
            for t in [t for t in waiting if t.cancelled]:
                waiting.remove(t)
                self.stats["cancelled_waiting"] += 1
            if not running:
                self._draining.discard(P)
            for t in list(waiting) if P not in self._draining else []:
                verdict = batch.fits(t.spec, joining=[j.spec for j in joining])
                if verdict == JOIN:
                    waiting.remove(t)
                    joining.append(t)
                elif verdict == DRAIN:  # it starts the next batch: no one overtakes it meanwhile
                    self._draining.add(P)
                    self.stats["drains"] += 1
                    break
            self._running[P].extend(joining)
        rows = []
        for t in joining:
            t.row = Row(t.spec, vocab_size=self.model.vocab_size, eos_ids=self.model.eos_ids,
                        tokenizer=self.model.tokenizer, started=t.submitted, tag=t)
            t.joined_running = running
            rows.append(t.row)
        self.stats["admitted"] += len(rows)
        self.stats["joined_running"] += len(rows) if running else 0
        self._deliver(P, batch.admit(rows))
        self._deliver(P, batch.step())
        self.stats["steps"] += 1
        with self._cond:
            self._running[P] = [t for t in self._running[P] if t.row is not None and not t.row.done]

    def _deliver(self, P: int, events: list[RowEvent]) -> None:  # noqa: N803
        self.stats["tokens"] += len(events)
        for e in events:
            t: Ticket = e.row.tag  # type: ignore[assignment]
            if t.cancelled:
                continue
            t.post(Event(t.index, token=e.token, text=e.text))
            if e.row.reason is not None:
                t.post(Event(t.index, result=e.row.result()))

    def _fail(self, P: int, message: str) -> None:  # noqa: N803
        batch = self._batches.pop(P, None)
        with self._cond:
            failed, self._running[P] = self._running[P], []
        for t in failed:
            t.post(Event(t.index, error=message))
        if batch is not None:
            batch.close()

    def _cancel_all(self, message: str) -> None:
        """Every request gets an error event and leaves (the caller holds the lock)."""
        for P in self.model.streams:
            for t in [*self._waiting[P], *self._running[P]]:
                if not t.cancelled:
                    t.post(Event(t.index, error=message))
                t.cancelled = True
            self._waiting[P].clear()
            self._running[P] = []
            batch = self._batches.pop(P, None)
            if batch is not None:
                batch.close()
