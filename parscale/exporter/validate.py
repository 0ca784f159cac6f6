"""Check an exported graph against the PyTorch module on CPU: prefill plus cached decode steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from parscale import contract
from parscale.exporter.model import ParScaleForCausalLM


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


def cpu_session(model_path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def validation_batch(vocab: int, seed: int, length: int = 12, pad: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two random prompts, the first left-padded by `pad`: (input_ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, length), dtype=np.int64)
    mask = np.ones((2, length), dtype=np.int64)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def compare(
    session: ort.InferenceSession, model: ParScaleForCausalLM, *, steps: int = 8, seed: int = 0,
    tolerance: float = 1e-3,
) -> ValidationReport:
    """Run both on the same left-padded batch of 2: prefill, then `steps` cached decode steps.

    Decode steps feed both sides the module's greedy token, so one early flip cannot hide later ones.
    """
    cfg = model.cfg
    ids, mask = validation_batch(cfg.vocab_size, seed)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    cache_dtype = np.float16 if _cache_is_fp16(session) else np.float32
    empty = np.zeros((2, cfg.cache_heads, 0, cfg.head_dim), dtype=cache_dtype)
    feed = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask, contract.POSITION_IDS: pos,
            contract.NUM_LOGITS_TO_KEEP: np.array(0, dtype=np.int64)}
    feed.update(dict.fromkeys(contract.past_names(cfg.num_hidden_layers), empty))
    names = contract.output_names(cfg.num_hidden_layers)

    with torch.no_grad():
        ref, cache = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos))
    out = session.run(names, feed)
    real = mask.astype(bool)
    prefill_diff = float(np.abs(out[0] - ref.numpy())[real].max())
    greedy = bool((out[0].argmax(-1) == ref.numpy().argmax(-1))[real].all())

    decode_diff = 0.0
    for _ in range(steps):
        nxt = ref[:, -1].argmax(-1, keepdim=True)  # (2, 1)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        past = dict(zip(contract.past_names(cfg.num_hidden_layers), out[1:], strict=True))
        feed = {contract.INPUT_IDS: nxt.numpy(), contract.ATTENTION_MASK: mask,
                contract.POSITION_IDS: pos, contract.NUM_LOGITS_TO_KEEP: np.array(1, dtype=np.int64),
                **past}
        with torch.no_grad():
            ref, cache = model(nxt, torch.from_numpy(mask), torch.from_numpy(pos), cache, 1)
        out = session.run(names, feed)
        decode_diff = max(decode_diff, float(np.abs(out[0] - ref.numpy()).max()))
        greedy &= bool((out[0].argmax(-1) == ref.numpy().argmax(-1)).all())
    return ValidationReport(
        max_abs_diff=max(prefill_diff, decode_diff), prefill_diff=prefill_diff,
        decode_diff=decode_diff, greedy_match=greedy, steps=steps, tolerance=tolerance,
    )


def _cache_is_fp16(session: ort.InferenceSession) -> bool:
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    return bool(past) and past[0].type == "tensor(float16)"
