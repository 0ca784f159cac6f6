"""Block-wise weight quantization math: pure numpy functions, no graph and no policy.

A weight matrix `w` of shape (N, K) is quantized along K in blocks of `block_size` values; every
(row, block) gets one scale and, when asymmetric, one zero point:

    w[n, k] ~= (q[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]

with q an unsigned integer in [0, 2**bits). This is the layout of ONNX Runtime's `MatMulNBits`
(B is (N, k_blocks, blob_size) uint8, packed low-order bits first) and, flattened to
(N, k_blocks * blob_size), of `GatherBlockQuantized` data quantized along its last axis, which
is what lets a tied embedding table serve both nodes.

Symmetric blocks store no zero point: it is implicitly 2**(bits-1) (8 for int4, 128 for int8),
the default both kernels assume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockQuantized:
    """A quantized (N, K) matrix. `q` holds one unpacked code per value, K padded to whole blocks."""

    q: np.ndarray  # uint8 (N, k_blocks, block_size), codes in [0, 2**bits)
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray | None  # uint8 (N, k_blocks); None when symmetric (implicit 2**(bits-1))
    bits: int
    block_size: int
    K: int  # columns before padding

    @property
    def N(self) -> int:  # noqa: N802
        return int(self.q.shape[0])

    @property
    def k_blocks(self) -> int:
        return int(self.q.shape[1])


def _check(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        # Both ONNX Runtime kernels require a power of two >= 16.
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, *, symmetric: bool, scale_dtype: np.dtype | type = np.float32,
) -> BlockQuantized:
    """Round-to-nearest block quantization of a 2-D float matrix along its last axis.

    Symmetric: the value of largest magnitude in a block maps to code 0 (its sign folded into the
    scale, as ONNX Runtime's own quantizer does), so all 2**bits codes are usable.
    Asymmetric: the block's range, widened to contain 0 (so that zero stays exact), is split
    into 2**bits - 1 steps and the zero point is the code of 0.
    Scales are rounded to `scale_dtype` (float16 for an fp16 graph) before the codes are chosen, so
    that the codes are the best ones for the scales the kernel will actually use.
    """
    _check(bits, block_size)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    N, K = w.shape
    k_blocks = -(-K // block_size)
    padded = np.zeros((N, k_blocks * block_size), dtype=np.float32)
    padded[:, :K] = w
    blocks = padded.reshape(N, k_blocks, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        idx = np.abs(blocks).argmax(-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, -1)[..., 0]  # signed value of largest magnitude
        scales = _round_to(extreme / -mid, scale_dtype)
        zero = np.full(scales.shape, mid, dtype=np.float32)
        inv = _inverse(scales)
    else:
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scales = _round_to((hi - lo) / qmax, scale_dtype)
        inv = _inverse(scales)
        zero = np.clip(np.round(-lo * inv), 0, qmax)
    q = np.clip(np.round(blocks * inv[..., None]) + zero[..., None], 0, qmax).astype(np.uint8)
    zp = None if symmetric else zero.astype(np.uint8)
    return BlockQuantized(q=q, scales=scales, zero_points=zp, bits=bits, block_size=block_size, K=K)


def _round_to(x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    return x.astype(dtype).astype(np.float32)


def _inverse(scales: np.ndarray) -> np.ndarray:
    """1 / scale, and 0 for an all-zero block (its codes then all equal the zero point)."""
    return np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)


def dequantize_blockwise(bq: BlockQuantized) -> np.ndarray:
    """The float32 (N, K) matrix that `bq` stands for (the padding dropped)."""
    zp = bq.zero_points if bq.zero_points is not None else np.full(bq.scales.shape, 1 << (bq.bits - 1))
    w = (bq.q.astype(np.float32) - zp[..., None].astype(np.float32)) * bq.scales[..., None]
    return w.reshape(bq.N, -1)[:, : bq.K]


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, low-order bits first: 4-bit pairs share a byte.

    The last axis of a 4-bit input is padded with a zero code to an even length.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `n` codes of the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :n].copy()
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :n]


def packed_weight(bq: BlockQuantized) -> np.ndarray:
    """`MatMulNBits` input B: uint8 (N, k_blocks, block_size * bits / 8)."""
    return pack_bits(bq.q, bq.bits)


def packed_zero_points(bq: BlockQuantized) -> np.ndarray | None:
    """Zero points packed like B along the block axis: uint8 (N, ceil(k_blocks * bits / 8))."""
    return None if bq.zero_points is None else pack_bits(bq.zero_points, bq.bits)


def bits_per_weight(bq: BlockQuantized, scale_bytes: int = 4) -> float:
    """Stored bits (codes, scales, zero points, packing padding included) over the N*K weights."""
    return 8.0 * stored_bytes(bq, scale_bytes) / (bq.N * bq.K)


def stored_bytes(bq: BlockQuantized, scale_bytes: int = 4) -> int:
    """Bytes of the packed codes, the scales (`scale_bytes` each) and the packed zero points."""
    n = packed_weight_nbytes(bq.N, bq.k_blocks, bq.block_size, bq.bits)
    n += bq.N * bq.k_blocks * scale_bytes
    if bq.zero_points is not None:
        n += bq.N * -(-bq.k_blocks * bq.bits // 8)
    return n


def packed_weight_nbytes(N: int, k_blocks: int, block_size: int, bits: int) -> int:  # noqa: N803
    return N * k_blocks * block_size * bits // 8
