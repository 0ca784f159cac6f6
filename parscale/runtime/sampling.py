"""Next-token selection in pure numpy: greedy, temperature, top-k, top-p, repetition penalty.

Everything works on a (batch, vocab) float32 logits array, one row per sequence, and draws from a
seeded `numpy.random.Generator`, so a seed reproduces a run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parscale.args import check_bool, check_float, check_int, check_seed
from parscale.errors import ParScaleError

# The floors of the sampling numbers (README: Runtime). A temperature below MIN_TEMPERATURE is greedy:
# T -> 0 is argmax in the limit, and dividing float32 logits by a vanishing T overflows to inf/NaN
# (1e-38 sampled the last token of the vocabulary every step). A repetition penalty outside
# [MIN_PENALTY, MAX_PENALTY] is refused: it has no limit to fall back on, and at 1e-38 it
# overflowed the same way.
MIN_TEMPERATURE = 1e-3
MIN_PENALTY, MAX_PENALTY = 1e-2, 1e2


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. greedy=True, temperature 0 or a temperature below MIN_TEMPERATURE
    mean argmax. Every field is type-checked (ParScaleError naming it; numpy numbers are taken, bools
    only for `greedy`) and stored as a plain Python value."""

    greedy: bool = False
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already seen
    seed: int | None = None

    def __post_init__(self) -> None:
        checked = {
            "greedy": check_bool(self.greedy, "greedy"),
            "temperature": check_float(self.temperature, "temperature", minimum=0),
            "top_k": check_int(self.top_k, "top_k", minimum=0),
            "top_p": check_float(self.top_p, "top_p", minimum=0, maximum=1),
            "repetition_penalty": check_float(self.repetition_penalty, "repetition_penalty",
                                              minimum=MIN_PENALTY, maximum=MAX_PENALTY),
            "seed": check_seed(self.seed),
        }
        if checked["top_p"] == 0:
            raise ParScaleError("top_p must be in (0, 1], got 0")
        if checked["greedy"] and checked["temperature"] > 0:
            raise ParScaleError("greedy decoding takes no temperature; pass one or the other")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < MIN_TEMPERATURE


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL / transformers rule: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    if penalty == 1.0:
        return logits
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row (ties at the threshold kept), the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = -np.partition(-logits, k - 1, axis=-1)[:, k - 1 : k]  # the k-th largest value per row
    return np.where(logits >= kth, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float64)  # float64: tiny probabilities must not round the sum away
    return e / e.sum(axis=-1, keepdims=True)


def nucleus(probs: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-p set of one row: (token ids, their probabilities), largest first, mass >= p.

    Exact without sorting the whole vocabulary: the nucleus is a prefix of the sorted order, so
    sorting the m most probable tokens suffices once their mass reaches p (m doubles until it does).
    """
    v = probs.shape[0]
    m = min(256, v)
    while True:
        idx = np.argpartition(-probs, m - 1)[:m] if m < v else np.arange(v)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        cum = np.cumsum(probs[idx])
        if cum[-1] >= p or m == v:
            n = int(np.searchsorted(cum, p)) + 1  # smallest prefix whose mass reaches p
            return idx[: min(n, m)], probs[idx[: min(n, m)]]
        m = min(2 * m, v)


class Sampler:
    """Picks one token per row; keeps the per-row set of seen tokens for the repetition penalty."""

    def __init__(self, config: SamplingConfig, vocab_size: int, batch: int,
                 rng: np.random.Generator | None = None) -> None:
        """`rng`: the generator to draw from (default: one seeded with `config.seed`)."""
        self.config = config
        self.rng = rng if rng is not None else np.random.default_rng(config.seed)
        self.seen = np.zeros((batch, vocab_size), dtype=bool) if config.repetition_penalty != 1.0 else None

    def observe(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Mark tokens (batch, n) as seen; `mask` (batch, n) leaves padding out."""
        if self.seen is None:
            return
        rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
        keep = np.ones(ids.shape, dtype=bool) if mask is None else mask.astype(bool)
        self.seen[rows[keep], ids[keep]] = True

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """(batch, vocab) float logits -> (batch,) int64 token ids."""
        cfg = self.config
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, cfg.repetition_penalty)
        if cfg.is_greedy:
            return logits.argmax(axis=-1).astype(np.int64)
        logits = top_k_filter(logits / np.float32(cfg.temperature), cfg.top_k)
        probs = softmax(logits)
        out = np.empty(probs.shape[0], dtype=np.int64)
        for row in range(probs.shape[0]):
            if cfg.top_p < 1.0:
                ids, p = nucleus(probs[row], cfg.top_p)
            else:
                ids, p = np.arange(probs.shape[1]), probs[row]
            out[row] = ids[draw(p, self.rng)]
        return out


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to p (inverse CDF: one uniform number per draw)."""
    cum = np.cumsum(p)
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(p) - 1)
