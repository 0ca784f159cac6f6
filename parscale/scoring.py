"""Scoring token streams: the windows a text is cut into, and the NLL and KL of logits.

One scorer for `parscale eval`, `parscale compare`, the export's fidelity check and training's
held-out loss, so that they agree on the same text. Numpy only.

Windows: `plan_windows(n, window, stride)` cuts ids[0:n] into windows of `window` input tokens that
advance by `stride`; window w feeds ids[w.start : w.start + w.length] and predicts the next token
at each position. Every target ids[1:n] is scored exactly once, by the first window whose
prediction of it has not been scored yet (the first `skip` predictions of a window were scored by
an earlier one), so every scored token after the first window sees at least `window - stride`
tokens of context. With stride = window the windows do not overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from parscale.errors import ParScaleError

NllFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (inputs [b, m], targets [b, m]) -> nll [b, m]


@dataclass(frozen=True)
class Window:
    """Inputs ids[start:start+length] predict ids[start+1:start+length+1]; the first `skip`
    predictions were scored by an earlier window."""

    start: int
    length: int
    skip: int


def plan_windows(n_ids: int, window: int, stride: int) -> list[Window]:
    """Windows scoring targets ids[1:n_ids], each once (see the module docstring)."""
    if window < 1 or not 1 <= stride <= window:
        raise ParScaleError(f"need window >= 1 and 1 <= stride <= window, got {window}, {stride}")
    windows: list[Window] = []
    scored_until = 0  # targets ids[1..scored_until] are done
    start = 0
    while scored_until < n_ids - 1:
        end = min(start + window, n_ids - 1)
        windows.append(Window(start, end - start, scored_until - start))
        scored_until = end
        start += stride
    return windows


def full_windows(n_ids: int, window: int, max_windows: int | None = None) -> list[Window]:
    """The non-overlapping windows of exactly `window` inputs (a short tail is dropped), the first
    `max_windows` of them: equal shapes, for scorers that compare two models position by position."""
    windows = [w for w in plan_windows(n_ids, window, window) if w.length == window]
    if not windows:
        raise ParScaleError(f"the token stream has {n_ids} tokens, fewer than one window of {window} "
                            "plus the token it predicts")
    return windows[:max_windows] if max_windows is not None else windows


def spread(windows: Sequence[Window], n: int) -> list[Window]:
    """`n` windows evenly spaced over the list (all of them when n is 0 or too large)."""
    if n <= 0 or n >= len(windows):
        return list(windows)
    picks = np.linspace(0, len(windows) - 1, n).round().astype(int)
    return [windows[i] for i in picks]


def window_arrays(ids: np.ndarray, windows: Sequence[Window]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (len(windows), length), of windows of one length."""
    length = windows[0].length
    if any(w.length != length for w in windows):
        raise ParScaleError("windows of different lengths cannot be stacked")
    inputs = np.stack([ids[w.start:w.start + length] for w in windows]).astype(np.int64)
    targets = np.stack([ids[w.start + 1:w.start + length + 1] for w in windows]).astype(np.int64)
    return inputs, targets


def score_windows(
    nll_fn: NllFn, ids: np.ndarray, windows: Sequence[Window], batch_size: int = 8
) -> tuple[float, int]:
    """(sum of NLL in nats, tokens scored) over `windows`, batching windows of equal length."""
    total, count = 0.0, 0
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(w.length, []).append(w)
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            nll = np.asarray(nll_fn(*window_arrays(ids, chunk)), dtype=np.float64)
            for row, w in zip(nll, chunk, strict=True):
                total += float(row[w.skip:].sum())
                count += length - w.skip
    return total, count


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats, float64) of `targets` (...) under `logits` (..., vocab)."""
    return -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats over the last axis, from log-probabilities."""
    return (np.exp(logp) * (logp - logq)).sum(-1)
