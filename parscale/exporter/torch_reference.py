"""Check an exported graph against the PyTorch module on CPU: prefill plus cached decode steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from parscale.driver import GraphInfo, prefill_decode
from parscale.modeling.model import ParScaleForCausalLM


@dataclass
class ValidationReport:
    """Largest |logit difference| between the export and the module, at real (non-padded) positions."""

    max_abs_diff: float
    prefill_diff: float
    decode_diff: float
    greedy_match: bool  # argmax of the export equals the module's at every compared position
    steps: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.greedy_match


def validation_batch(vocab: int, seed: int, length: int = 12, pad: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two random prompts, the first left-padded by `pad`: (input_ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, length), dtype=np.int64)
    mask = np.ones((2, length), dtype=np.int64)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


@dataclass
class Reference:
    """The PyTorch module's logits on the validation batch: prefill, then greedy cached decode steps.

    Computed before the graph is run, so the module and an ONNX Runtime session of the same
    weights never need memory at the same time.
    """

    ids: np.ndarray  # (2, s) prompts, the first left-padded
    mask: np.ndarray  # (2, s)
    logits: list[np.ndarray]  # [prefill (2, s, vocab), then one (2, 1, vocab) per decode step]
    tokens: list[np.ndarray]  # the module's greedy token fed at each decode step, (2, 1)
    P: int = 1  # the module's streams: a graph serving several P is driven at this one


def reference_run(model: ParScaleForCausalLM, *, steps: int = 8, seed: int = 0) -> Reference:
    """Run the module on the validation batch: prefill, then `steps` decode steps on its own greedy tokens."""
    cfg = model.cfg
    ids, mask = validation_batch(cfg.vocab_size, seed)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, tokens = [], []
    with torch.no_grad():
        ref, cache = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos))
        logits.append(ref.numpy())
        for _ in range(steps):
            nxt = ref[:, -1].argmax(-1, keepdim=True)  # (2, 1)
            tokens.append(nxt.numpy())
            mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            ref, cache = model(nxt, torch.from_numpy(mask), torch.from_numpy(pos), cache, 1)
            logits.append(ref.numpy())
    return Reference(ids=ids, mask=mask[:, :ids.shape[1]], logits=logits, tokens=tokens, P=cfg.P)


def check_graph(session: ort.InferenceSession, ref: Reference, *, tolerance: float = 1e-3) -> ValidationReport:
    """Run the graph on the reference's inputs and compare: prefill, then the cached decode steps.

    Decode steps feed the graph the module's greedy token, so one early flip cannot hide later ones.
    """
    real = ref.mask.astype(bool)
    steps = prefill_decode(session, GraphInfo.of(session).at(ref.P), ref.ids, ref.mask, ref.tokens)
    logits = next(steps)
    prefill_diff = _max_diff(logits, ref.logits[0], real)
    greedy = bool((logits.argmax(-1) == ref.logits[0].argmax(-1))[real].all())
    decode_diff = 0.0
    for logits, expected in zip(steps, ref.logits[1:], strict=True):
        decode_diff = max(decode_diff, _max_diff(logits, expected, None))
        greedy &= bool((logits.argmax(-1) == expected.argmax(-1)).all())
    return ValidationReport(
        max_abs_diff=max(prefill_diff, decode_diff), prefill_diff=prefill_diff,
        decode_diff=decode_diff, greedy_match=greedy, steps=len(ref.tokens), tolerance=tolerance,
    )


def compare(
    session: ort.InferenceSession, model: ParScaleForCausalLM, *, steps: int = 8, seed: int = 0,
    tolerance: float = 1e-3,
) -> ValidationReport:
    """`check_graph` against `reference_run` of `model`: the graph against the module, on CPU."""
    return check_graph(session, reference_run(model, steps=steps, seed=seed), tolerance=tolerance)


def _max_diff(got: np.ndarray, expected: np.ndarray, where: np.ndarray | None) -> float:
    """Largest |difference|; NaN or Inf on either side counts as infinitely different."""
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    if where is not None:
        diff = diff[where]
    return float(np.nan_to_num(diff, nan=np.inf).max())

