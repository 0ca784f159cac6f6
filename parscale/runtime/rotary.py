"""Moving cached keys to other cache rows: the rotary embedding GroupQueryAttention applied, turned further.

GroupQueryAttention rotates each key by its cache row (half-split rotary, `rotary_interleaved=0`), and
the graph stores prefix row `j` of a sequence with `pad` left-padding tokens rotated by
RoPE(prefix_rows + pad - j) (contract.py). Every row of a sequence therefore carries a rotation that
grows by one with each column of left padding, so the cache of a sequence prefilled with no padding
becomes that of the same sequence behind `shift` columns of padding by moving its token rows
`shift` columns later and turning every key (prefix rows included) by RoPE(shift); values are not
rotated. Rotations compose exactly in real arithmetic; in float32 the keys agree with a padded
prefill's to about 1e-6 (relative).
"""

from __future__ import annotations

import numpy as np


def rotate(keys: np.ndarray, shift: int, theta: float) -> np.ndarray:
    """`keys` (..., rows, head_dim), each turned by RoPE(`shift`) with base `theta` (half-split halves);
    a new array of the same dtype, computed in float32 (a float32 cache's own precision)."""
    d = keys.shape[-1]
    h = d // 2
    angle = shift * theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    x = keys.astype(np.float32, copy=False)
    out = np.empty(x.shape, dtype=np.float32)
    np.multiply(x[..., :h], cos, out=out[..., :h])
    out[..., :h] -= x[..., h:] * sin
    np.multiply(x[..., h:], cos, out=out[..., h:])
    out[..., h:] += x[..., :h] * sin
    return out.astype(keys.dtype, copy=False)
