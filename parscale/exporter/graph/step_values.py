"""What every decoder layer shares within one step: a frozen record of graph value names.

Computed once per graph, before the layers (`attention.Attention.step_values`), and read by each
layer's attention; nothing is set on the decoder as it goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FirstStep:
    """The first step's prefix values (computed inside an `If`, so that decode steps skip them)."""

    expand_rows: str  # [b, 1, 1]: the Expand shape that repeats a (1, N, ...) table per sequence
    prefix_pos: str  # (b, N): the rotary position each prefix row is stored at
    bias: str  # (b, 1, N+s, N+T): the key bias of the N zero query rows and the tokens
    bias_p1: str | None  # the same with the prefix columns masked: P=1 beside prefixed P (else None)
    zero_queries: Mapping[int, str]  # P -> (b, N, P*H*D) zero rows put in front of the queries


@dataclass(frozen=True)
class StepValues:
    """Graph values every layer's attention reads this step."""

    streams: str | None  # [P] read from the cache heads (a multi-P graph), else None
    batch: str  # [b]
    total: str  # int32 scalar: cache rows after this step (N + T)
    seqlens: str  # (b,) int32: total - 1, GroupQueryAttention's seqlens_k
    bias: str  # (b, 1, s, N+T): 0 over prefix columns and real tokens, a large negative over padding
    bias_p1: str | None  # the same with the prefix columns masked: P=1 beside prefixed P (else None)
    cos: str  # rotary caches (rows, D/2), indexed by cache row
    sin: str
    first: str | None  # bool [1]: the first step (no past), which writes the prefix rows; None: no prefix
    first_step: FirstStep | None  # None: no prefix
