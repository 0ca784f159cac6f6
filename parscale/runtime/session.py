"""The runtime's forward step: the KV cache kept in OrtValues between steps (sessions: `parscale.graph`).

The cache never passes through numpy: each step binds the previous step's `present.*` OrtValues
as the next step's `past_key_values.*` (I/O binding), and ONNX Runtime allocates the new presents
on the execution device (on CUDA they never leave the GPU). Only the logits come back to the host,
into one preallocated buffer of shape (batch, 1, vocab), because we always ask for the last
position only (`num_logits_to_keep` = 1).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from parscale import contract
from parscale.errors import ParScaleError
from parscale.graph import CUDA, GraphInfo


class Engine:
    """Runs prefill and decode steps with I/O binding; holds the cache between steps.

    An Engine is one generation's state (its I/O binding, KV cache and logits buffer) and serves
    one call at a time: `Model` makes a new one for every call, so concurrent calls share only the
    session, whose runs are thread-safe with separate bindings.
    """

    def __init__(self, session: ort.InferenceSession, info: GraphInfo, provider: str) -> None:
        self.session, self.info = session, info
        self.device = "cuda" if provider == CUDA else "cpu"
        self.past_names = contract.past_names(info.num_layers)
        self.present_names = contract.present_names(info.num_layers)
        self.keep_one = np.array(1, dtype=np.int64)
        self.cache: list[ort.OrtValue] = []
        self.logits = np.empty((0, 1, info.vocab_size), dtype=np.float32)
        self.binding = session.io_binding()

    def reset(self, batch: int) -> None:
        """An empty cache (length 0) for a new batch, and the logits buffer for that batch size."""
        shape = (batch, self.info.cache_heads, 0, self.info.head_dim)
        empty = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.info.cache_dtype, self.device, 0)
        self.cache = [empty] * len(self.past_names)
        if self.logits.shape[0] != batch:
            self.logits = np.empty((batch, 1, self.info.vocab_size), dtype=np.float32)
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)  # shares memory

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run the graph on new tokens; returns last-position logits (batch, vocab), a view reused next step."""
        b = self.binding
        b.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        b.bind_cpu_input(contract.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        b.bind_cpu_input(contract.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        if self.info.has_keep:
            b.bind_cpu_input(contract.NUM_LOGITS_TO_KEEP, self.keep_one)
        for name, value in zip(self.past_names, self.cache, strict=True):
            b.bind_ortvalue_input(name, value)
        b.clear_binding_outputs()
        if self.info.has_keep:
            b.bind_ortvalue_output(contract.LOGITS, self._logits_value)
        else:  # an older graph without the input returns every position: let ORT size the output
            b.bind_output(contract.LOGITS, "cpu")
        for name in self.present_names:
            b.bind_output(name, self.device, 0)
        try:
            self.session.run_with_iobinding(b)
        except Exception as e:  # ORT's own exception types: a damaged graph or weights fail here
            raise ParScaleError(f"onnxruntime failed running the graph: {str(e).splitlines()[0]}") from None
        outputs = b.get_outputs()
        # Order of get_outputs() is the binding order: logits, then the presents.
        self.cache = [outputs[i + 1] for i in range(len(self.present_names))]
        logits = self.logits[:, -1] if self.info.has_keep else outputs[0].numpy()[:, -1]
        if not np.isfinite(logits).all():  # cheap (one row per sequence); NaN would decode as token 0 forever
            raise ParScaleError("the model produced NaN/Inf logits: its weights or inputs are damaged; "
                                "load it with verification on (the default) to find the tensor, or re-export")
        return logits

    def release(self) -> None:
        """Drop the cache (its memory returns to the allocator)."""
        self.cache = []
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()

