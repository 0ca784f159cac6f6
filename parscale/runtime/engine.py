"""The runtime's forward step: one KV-cache buffer per layer, bound as both past and present.

The Engine drives the graph through `parscale.driver` (its token inputs and its one ORT error
wrapping) and adds what generation needs on top: I/O binding and a cache that outlives each step.

A generation allocates, per layer and kind, one buffer of (batch, P*Hkv, prefix rows + prompt +
new tokens, head_dim), zero-filled, on the execution device, and binds it as both the
`past_key_values.*` input and the `present.*` output (I/O binding): GroupQueryAttention then writes
each step's keys and values in place, and nothing is copied from step to step (contract.py has the
buffer layout). On the CPU the zeroed buffer is mapped lazily, so a long `max_new_tokens` costs memory
only for the rows written. Only the logits come back to the host: the graph's `logits` output
holds the last position's alone (the LM head runs on that position only, prefill included), so one
(batch, 1, vocab) buffer is bound for the whole call, as is one for `kept_logits`, which holds the
same position at the graph's default `num_logits_to_keep` (1).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from parscale import contract
from parscale.driver import CUDA, GraphInfo, run_graph, token_inputs
from parscale.errors import ParScaleError
from parscale.runtime.memory import check_cache_fits
from parscale.runtime.rotary import rotate


class Engine:
    """Runs prefill and decode steps with I/O binding; holds the cache between steps.

    An Engine is one generation's state (its I/O binding, KV cache and logits buffer) and serves
    one call at a time: `Model` makes a new one for every call, so concurrent calls share only the
    session, whose runs are thread-safe with separate bindings. `reset` binds a cache for a fixed
    batch; `reserve` and `use` (with `move` and `grow` on the CPU) serve a batch whose rows join and
    leave between steps (`parscale.runtime.batch`).
    """

    def __init__(self, session: ort.InferenceSession, info: GraphInfo, provider: str,
                 rope_theta: float | None = None) -> None:
        self.session, self.info, self.rope_theta = session, info, rope_theta
        self.device = "cuda" if provider == CUDA else "cpu"
        self.past_names = contract.past_names(info.num_layers)
        self.present_names = contract.present_names(info.num_layers)
        self.cache: list[ort.OrtValue] = []
        self._host_cache: list[np.ndarray] = []  # the CPU buffers the OrtValues wrap
        if info.prefix_rows is None:
            raise ParScaleError("the graph does not record its cache layout (io.cache in its metadata): it was not "
                                "written by this parscale version; re-export the model")
        self.logits = np.empty((0, 1, info.vocab_size), dtype=np.float32)
        self.binding = session.io_binding()
        self.slots = self.max_tokens = 0

    def reset(self, batch: int, max_tokens: int) -> None:
        """Zeroed cache buffers for `batch` sequences of up to `max_tokens` tokens (prompt, padding and
        new tokens), all of them bound, and the logits buffer for that batch size."""
        self.reserve(batch, max_tokens)
        self.use(0, batch)

    def reserve(self, slots: int, max_tokens: int) -> None:
        """Zeroed cache buffers with room for `slots` sequences of up to `max_tokens` tokens each; `use`
        then binds the slots the next steps run (a batch whose rows join and leave between steps)."""
        info = self.info
        assert info.prefix_rows is not None
        check_cache_fits(info, slots, max_tokens)
        shape = (slots, info.cache_heads, info.prefix_rows + max_tokens, info.head_dim)
        self.release()
        self._host_cache = [np.zeros(shape, dtype=info.cache_dtype) for _ in self.past_names]
        if self.device == "cpu":
            self.cache = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host_cache]  # shares memory
        else:
            self.cache = [ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in self._host_cache]
            self._host_cache = []
        self.slots, self.max_tokens = slots, max_tokens

    @property
    def rearranges(self) -> bool:
        """Whether slots can be bound in any range, moved and grown (`use`, `move`, `grow`): the cache
        then lives in host memory (CPU). A device cache is bound whole."""
        return self.device == "cpu"

    def use(self, start: int, stop: int) -> None:
        """Bind slots start..stop-1 as the cache of the next steps (a contiguous view: nothing is copied)."""
        if self.rearranges:
            self.cache = [ort.OrtValue.ortvalue_from_numpy(a[start:stop]) for a in self._host_cache]  # shares memory
        elif (start, stop) != (0, self.slots):
            raise ValueError(f"a {self.device} cache is bound whole (slots 0..{self.slots}), not {start}..{stop}")
        batch = stop - start
        if self.logits.shape[0] != batch:
            self.logits = np.empty((batch, 1, self.info.vocab_size), dtype=np.float32)
            self._logits_values = [ort.OrtValue.ortvalue_from_numpy(self.logits),  # shares memory
                                   ort.OrtValue.ortvalue_from_numpy(np.empty_like(self.logits))]
        # Bound until the slots change: every step reads and writes the same buffers.
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, value in zip((contract.LOGITS, contract.KEPT_LOGITS), self._logits_values, strict=True):
            b.bind_ortvalue_output(name, value)
        for past, present, value in zip(self.past_names, self.present_names, self.cache, strict=True):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)  # the same buffer: written in place

    def move(self, src: int, dst: int, tokens: int) -> None:
        """Copy slot `src`'s cache (prefix rows and `tokens` token rows) into slot `dst` (host cache only)."""
        assert self.info.prefix_rows is not None
        rows = self.info.prefix_rows + tokens
        for a in self._host_cache:
            a[dst, :, :rows] = a[src, :, :rows]

    def grow(self, max_tokens: int, slots_used: int, tokens: int) -> None:
        """Room for `max_tokens` tokens per slot, keeping the first `slots_used` slots' prefix rows and
        `tokens` token rows (host cache only); bind again with `use`."""
        assert self.info.prefix_rows is not None
        rows = self.info.prefix_rows + tokens
        old = self._host_cache
        self.reserve(self.slots, max_tokens)
        for a, b in zip(self._host_cache, old, strict=True):
            a[:slots_used, :, :rows] = b[:slots_used, :, :rows]

    @property
    def shifts(self) -> bool:
        """Whether slots' token rows can be moved to other columns (`shift`): a host cache, and the
        rotary base the keys were turned with (config.json's rope_theta) known."""
        return self.rearranges and self.rope_theta is not None

    def shift(self, start: int, stop: int, by: int, tokens: int, first: int = 0) -> None:
        """Move token columns first..first+tokens-1 of slots start..stop-1 `by` columns later (earlier if
        negative), turning every key by RoPE(`by`), prefix rows included (`parscale.runtime.rotary`):
        the cache the same tokens get behind `by` more (fewer) columns of left padding. Host cache only."""
        assert self.shifts and self.info.prefix_rows is not None and self.rope_theta is not None
        r = self.info.prefix_rows
        src, dst = slice(r + first, r + first + tokens), slice(r + first + by, r + first + by + tokens)
        for name, a in zip(self.past_names, self._host_cache, strict=True):
            rows = a[start:stop]
            if name.endswith(".key"):
                moved = rotate(rows[:, :, src], by, self.rope_theta)
                rows[:, :, :r] = rotate(rows[:, :, :r], by, self.rope_theta)
            else:
                moved = rows[:, :, src].copy()
            rows[:, :, dst] = moved

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run the graph on new tokens; returns last-position logits (batch, vocab), a view reused next step."""
        b = self.binding
        for name, value in token_inputs(input_ids, attention_mask, position_ids).items():
            b.bind_cpu_input(name, value)
        run_graph(lambda: self.session.run_with_iobinding(b))
        logits = self.logits[:, -1]
        if not np.isfinite(logits).all():  # cheap (one row per sequence); NaN would decode as token 0 forever
            raise ParScaleError("the model produced NaN/Inf logits: its weights or inputs are damaged; "
                                "load it with verification on (the default) to find the tensor, or re-export")
        return logits

    def release(self) -> None:
        """Drop the cache (its memory returns to the allocator)."""
        self.cache, self._host_cache = [], []
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()

