"""Is a served completion the model's greedy continuation? The check the server's tests and benchmark use.

A row decoded in a batch is left-padded (to the batch's length when it joins), which moves its tokens
to other cache rows. Rotary embeddings make that exact in real arithmetic, and float32 exports give
the same logits to about 1e-5; but quantized exports quantize activations to int8 inside their
matrix products (accuracy_level 4), which turns those ~1e-7 rounding differences into an occasional
one-step change of a quantized value: up to ~3e-2 on a logit. Where two tokens are that close, a
batched row may take the other one (on the embedded model's int8 export, 1 row of 120 differed within
32 greedy tokens, at a near-tie of 4e-4; none of 80 on a float32 export). So a served greedy completion
is checked token by token: each token must be the top one, or within `tolerance` of it, given the
prompt and the tokens before it (all fed at once, batch 1, no padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from parscale.graph import step
from parscale.runtime import Model

TOLERANCE = 0.05  # logits: above the largest change padding made on the int8 export measured (0.026)


def greedy_gaps(model: Model, prompt: Sequence[int], tokens: Sequence[int], P: int | None = None) -> np.ndarray:  # noqa: N803
    """For each of `tokens`, how far its logit lies below the largest (0: it is the argmax), the prompt and
    the tokens before it fed at once."""
    if not tokens:
        return np.zeros(0)
    info = model.info.at(model.check_streams(P))
    ids = np.array([[*prompt, *tokens[:-1]]], dtype=np.int64)
    n = ids.shape[1]
    logits, _ = step(model.session, info, ids, np.ones_like(ids), np.arange(n)[None], keep=0)
    rows = logits[0, len(prompt) - 1:]  # the positions that predict `tokens`
    return rows.max(axis=-1) - rows[np.arange(len(tokens)), np.asarray(tokens)]


def is_greedy(model: Model, prompt: Sequence[int], tokens: Sequence[int], P: int | None = None,  # noqa: N803
              tolerance: float = TOLERANCE) -> bool:
    """Whether every token is the greedy choice, up to `tolerance` (see the module docstring)."""
    return bool((greedy_gaps(model, prompt, tokens, P) <= tolerance).all())
