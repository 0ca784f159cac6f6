"""The P parallel streams in the graph: fan-out of the embeddings, the per-P `If` of a graph serving
several P, the kept positions, and the aggregation that mixes the streams into one.

Hidden states are (b, s*P, h): token-major, stream-minor, so that a (b, s, P*H*D) view of the query
projection puts stream p's heads at p*H + h, which is the cache layout of the contract. A multi-P
graph reads P from the cache the runtime binds (P*Hkv heads) and runs each P's own parts in nested
`If` branches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from onnx import TensorProto

from parscale import contract
from parscale.exporter.graph.weights import ONNX_DTYPE, WeightWriter
from parscale.modeling.model import ParScaleForCausalLM

_INT_MAX = np.iinfo(np.int64).max
# The name of the hidden states' row axis, s*P, where shape inference cannot compute it (P > 1, or P read
# at run time): declared on the fan-out and on every attention output (`GraphBuilder.declare`).
ROWS = "rows"


class ParallelStreams:
    """The stream-dependent parts of the graph of `models` (P -> module over one backbone)."""

    def __init__(self, w: WeightWriter, models: dict[int, ParScaleForCausalLM]) -> None:
        self.w, self.b, self.models, self.Ps = w, w.b, models, sorted(models)
        self.multi = len(models) > 1
        self.cfg = models[self.Ps[-1]].cfg
        self.count: str | None = None  # [P] of a multi-P graph: set by `read_count`

    def read_count(self) -> str | None:
        """A multi-P graph's P, from the cache the runtime binds: (b, P*Hkv, rows, D); None for one P."""
        if not self.multi:
            return None
        b = self.b
        heads = b.op("Shape", contract.past_key(0), start=1, end=2)
        self.count = b.op("Div", heads, b.const([self.cfg.num_key_value_heads]))  # [P]
        return self.count

    def per_P(self, body: Callable[[int], list[str]], outputs: list[str]) -> list[str]:  # noqa: N802
        """`body(P)`'s outputs for the P the cache holds: nested `If` nodes over every P of the graph."""
        assert self.count is not None
        return self.b.switch(self.count, self.Ps, body, outputs)

    def fan_out(self, x: str) -> str:
        """(b, s, h) -> (b, s*P, h): every stream reads the same embedding."""
        b, h = self.b, self.cfg.hidden_size
        if not self.multi and self.Ps[0] == 1:
            return x
        x = b.op("Unsqueeze", x, b.const([2]))  # (b, s, 1, h)
        if self.count is not None:
            streams = b.op("Concat", b.const([1, 1]), self.count, b.const([1]), axis=0)
        else:
            streams = b.const([1, 1, self.Ps[0], 1])
        x = b.op("Expand", x, streams)  # (b, s, P, h)
        return self.rows(b.op("Reshape", x, b.const([0, -1, h])), h)  # (b, s*P, h)

    def rows(self, x: str, width: int) -> str:
        """Declare `x` (b, s*P, width) as (batch, ROWS, width) where inference cannot name its rows; returns `x`."""
        if self.multi or self.Ps[0] > 1:
            self.b.declare(x, self.w.onnx_dtype, [contract.BATCH, ROWS, width])
        return x

    def keep_last(self, x: str, keep: str) -> str:
        """The last `keep` positions of (b, s*P, h); keep == 0 keeps them all."""
        b, h = self.b, self.cfg.hidden_size
        if self.count is not None:
            shape = b.op("Concat", b.const([0, -1]), b.op("Mul", self.count, b.const([h])), axis=0)
        else:
            shape = b.const([0, -1, self.Ps[0] * h])
        tokens = b.op("Reshape", x, shape)  # (b, s, P*h)
        start = b.op("Where", b.op("Greater", keep, b.const(0)), b.op("Neg", keep), b.const(0))
        tokens = b.op("Slice", tokens, b.op("Unsqueeze", start, b.const([0])), b.const([_INT_MAX]), b.const([1]))
        return b.op("Reshape", tokens, b.const([0, -1, h]))

    def mix(self, y: str) -> str:
        """(b, k*P, h) -> (b, k, h): each P's aggregation (P=1: the one stream as it is)."""
        b = self.b
        if self.multi:
            return self.per_P(lambda p: [self.aggregate(y, p) if p > 1 else b.op("Identity", y)],
                              [b.fresh("mixed")])[0]
        return self.aggregate(y, self.Ps[0]) if self.Ps[0] > 1 else y

    def aggregate(self, y: str, P: int) -> str:  # noqa: N803
        """Mix the P stream states (b, k*P, h) into (b, k, h): softmax weights in float32, smoothed."""
        b, w, h = self.b, self.w, self.cfg.hidden_size
        agg, smooth = self.models[P].model.aggregate_layer, self.cfg.parscale_attn_smooth
        name = f"model.aggregate_layer.p{P}." if self.multi else "model.aggregate_layer."
        # The checkpoint's first Linear reads features hidden-major (k*P + p); our (b, k, P*h) view is
        # stream-major (p*h + k): permute its input columns once instead of the activations every step.
        w1 = agg[0].weight.detach().reshape(h, h, P).permute(0, 2, 1).reshape(h, P * h)
        concat = b.op("Reshape", y, b.const([0, -1, P * h]))  # (b, k, P*h)
        z = w.linear(concat, w1, name + "0", None, agg[0].bias)
        z = b.op("Mul", z, b.op("Sigmoid", z))
        z = w.linear(z, agg[2].weight, name + "2", None, agg[2].bias)  # (b, k, P)
        streams = b.op("Reshape", y, b.const([0, -1, P, h]))  # (b, k, P, h)
        if w.dtype != torch.float32:
            z, streams = w.cast(z, TensorProto.FLOAT), w.cast(streams, TensorProto.FLOAT)
        weights = b.op("Softmax", z, axis=-1)
        weights = b.op("Add", b.op("Mul", weights, b.const(1.0 - smooth, np.float32)),
                       b.const(smooth / P, np.float32))
        mixed = b.op("MatMul", b.op("Unsqueeze", weights, b.const([2])), streams)  # (b, k, 1, h)
        mixed = b.op("Reshape", mixed, b.const([0, -1, h]))
        if w.dtype != torch.float32:
            mixed = w.cast(mixed, ONNX_DTYPE[w.dtype])
        return mixed
