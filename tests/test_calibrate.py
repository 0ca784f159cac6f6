"""GPTQ calibration tokens: sampled from the checkpoint in the dtype it is stored in (bf16 where it can)."""

from __future__ import annotations

import numpy as np
import torch

from parscale.exporter.quant.calibrate import calibration_tokens, sampling_dtype
from parscale.modeling.checkpoint import stored_dtype


def test_stored_dtype_is_read_from_the_headers(tiny) -> None:
    assert stored_dtype(tiny.checkpoint(P=2, prefix=4, dtype="bfloat16")) == torch.bfloat16
    assert stored_dtype(tiny.checkpoint(P=2, prefix=4, dtype="float32")) == torch.float32


def test_a_bf16_checkpoint_is_sampled_in_bf16_where_the_cpu_has_bf16_units(tiny) -> None:
    bf16 = tiny.checkpoint(P=2, prefix=4, dtype="bfloat16")
    has_units = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert sampling_dtype(bf16) == (torch.bfloat16 if has_units else torch.float32)
    tokens, source = calibration_tokens(bf16, None)
    assert tokens.shape == (16, 127) and tokens.dtype == np.int64 and (tokens >= 0).all() and (tokens < 512).all()
    assert source.startswith(f"sampled from the model ({'bfloat16' if has_units else 'float32'}): 16 x 128 tokens")
    assert sampling_dtype(tiny.checkpoint(P=2, prefix=4, dtype="float32")) == torch.float32
