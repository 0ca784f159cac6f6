"""Is a served completion the model's greedy continuation? The check the server's tests and benchmark use.

A row decoded in a batch sits behind left padding (its cache moved, or prefilled padded, to align it
with the batch) and runs in matrix products of several rows. In real arithmetic neither changes its
logits; in float32 they move by about 1e-5. Quantized exports quantize activations inside their
matrix products (int8 codes per row), and a ~1e-7 rounding difference that flips one code moves the
next layer's inputs by a whole quantization step: on a random qwen2.5-0.5b int8 export the logits of
the same sequence moved by up to 0.08 (of a largest logit of 2.7) between no padding and 1, 7 or 64
columns of it. Where two tokens are closer than that, a batched row may take the other one.

So a served greedy completion is checked token by token against the model run at batch 1 with no
padding (prompt and tokens before it fed at once): each token's logit must be within the tolerance of
the top one. The tolerance is measured for that very sequence, not assumed: the same run behind
left padding gives how far this export's arithmetic moves these logits (`noise`); a batched row's top
and chosen logits can each have moved that far, so a token whose logit lies more than twice that
below the top (and more than `TOLERANCE`) was not the greedy choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from parscale.driver import step
from parscale.runtime import Model

TOLERANCE = 0.05  # logits: the least tolerance, whatever the measured noise (float32 exports: ~1e-5)
PADS = (1, 32)  # columns of left padding the noise is measured with


@dataclass(frozen=True)
class GreedyCheck:
    """A completion checked against the model's greedy choices."""

    gaps: np.ndarray  # per token: how far its logit lies below the largest (0: the argmax)
    noise: float  # the largest change of those logits when the same sequence sits behind left padding

    @property
    def tolerance(self) -> float:
        return max(TOLERANCE, 2 * self.noise)

    @property
    def worst(self) -> float:
        return float(self.gaps.max(initial=0.0))

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance


def _logits(model: Model, ids: np.ndarray, pad: int, P: int | None) -> np.ndarray:  # noqa: N803
    """Every position's logits of `ids` (1, n) behind `pad` columns of left padding: (n, vocab)."""
    info = model.info.at(model.check_streams(P))
    n = ids.shape[1]
    padded = np.concatenate([np.zeros((1, pad), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones((1, n), np.int64)], axis=1)
    logits, _ = step(model.session, info, padded, mask, np.clip(mask.cumsum(1) - 1, 0, None), keep=0)
    return logits[0, pad:]


def check_greedy(model: Model, prompt: Sequence[int], tokens: Sequence[int], P: int | None = None,  # noqa: N803
                 pads: Sequence[int] = PADS) -> GreedyCheck:
    """Check `tokens`, a greedy completion of `prompt` served at P streams (see the module docstring)."""
    if not tokens:
        return GreedyCheck(np.zeros(0), 0.0)
    ids = np.array([[*prompt, *tokens[:-1]]], dtype=np.int64)
    at = slice(len(prompt) - 1, None)  # the positions that predict `tokens`
    rows = _logits(model, ids, 0, P)[at]
    gaps = rows.max(axis=-1) - rows[np.arange(len(tokens)), np.asarray(tokens)]
    noise = max((float(np.abs(_logits(model, ids, pad, P)[at] - rows).max()) for pad in pads), default=0.0)
    return GreedyCheck(gaps, noise)
