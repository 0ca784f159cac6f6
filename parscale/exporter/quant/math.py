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

from collections.abc import Callable
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


# Range shrink factors tried by `clip_search`: clipping a block's few extreme values buys a finer
# step for all the others, which lowers the block's squared error for most trained weights.
CLIP_GRID = tuple(float(x) for x in np.round(np.linspace(1.0, 0.7, 25), 4))


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, *, symmetric: bool, scale_dtype: np.dtype | type = np.float32,
    clip_search: bool = False,
) -> BlockQuantized:
    """Round-to-nearest block quantization of a 2-D float matrix along its last axis.

    Symmetric: the value of largest magnitude in a block maps to code 0 (its sign folded into the
    scale, as ONNX Runtime's own quantizer does), so all 2**bits codes are usable.
    Asymmetric: the block's range, widened to contain 0 (so that zero stays exact), is split
    into 2**bits - 1 steps and the zero point is the code of 0.
    Scales are rounded to `scale_dtype` (float16 for an fp16 graph) before the codes are chosen, so
    that the codes are the best ones for the scales the kernel will actually use.
    `clip_search`: per block, shrink the range by the factor in `CLIP_GRID` that minimizes the
    block's squared round-trip error (1.0, plain round-to-nearest, is one of the candidates).
    """
    _check(bits, block_size)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    return _by_rows(w, lambda rows: _quantize_rows(rows, bits, block_size, symmetric, scale_dtype, clip_search))


# Rows quantized at once: every row is independent, and the temporaries of a whole LM head (several
# copies of a 151936 x 2048 float32 matrix) would need gigabytes.
CHUNK_BYTES = 64 << 20


def _by_rows(w: np.ndarray, quantize: Callable[[np.ndarray], BlockQuantized]) -> BlockQuantized:
    """Apply a row-wise quantizer to chunks of rows of `w` and join the results."""
    rows = max(1, CHUNK_BYTES // max(1, 4 * w.shape[1]))
    if w.shape[0] <= rows:
        return quantize(w)
    parts = [quantize(w[i:i + rows]) for i in range(0, w.shape[0], rows)]
    first = parts[0]
    zp = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])  # type: ignore[misc]
    return BlockQuantized(q=np.concatenate([p.q for p in parts]), scales=np.concatenate([p.scales for p in parts]),
                          zero_points=zp, bits=first.bits, block_size=first.block_size, K=first.K)


def _quantize_rows(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype: np.dtype | type, clip_search: bool,
) -> BlockQuantized:
    N, K = w.shape
    k_blocks = -(-K // block_size)
    padded = np.zeros((N, k_blocks * block_size), dtype=np.float32)
    padded[:, :K] = w
    blocks = padded.reshape(N, k_blocks, block_size)
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    best_err = None
    for shrink in CLIP_GRID if clip_search else (1.0,):
        scales, zero = _range(blocks, bits, symmetric, shrink, scale_dtype)
        q = _codes(blocks, scales, zero, bits)
        if not clip_search:
            best = (q, scales, zero)
            break
        err = (((q - zero[..., None]) * scales[..., None] - blocks) ** 2).sum(-1)
        if best is None or best_err is None:
            best, best_err = (q, scales, zero), err
            continue
        better = err < best_err
        best = tuple(np.where(better[..., None] if a.ndim == 3 else better, a, b)  # type: ignore[assignment]
                     for a, b in zip((q, scales, zero), best, strict=True))
        best_err = np.minimum(err, best_err)
    assert best is not None
    q, scales, zero = best
    zp = None if symmetric else zero.astype(np.uint8)
    return BlockQuantized(q=q.astype(np.uint8), scales=scales, zero_points=zp, bits=bits,
                          block_size=block_size, K=K)


def _range(
    blocks: np.ndarray, bits: int, symmetric: bool, shrink: float, scale_dtype: np.dtype | type,
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and (float-valued integer) zero points of each block for a range shrunk by `shrink`."""
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        idx = np.abs(blocks).argmax(-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, -1)[..., 0]  # signed value of largest magnitude
        scales = _round_to(shrink * extreme / -mid, scale_dtype)
        return scales, np.full(scales.shape, mid, dtype=np.float32)
    lo = np.minimum(blocks.min(-1), 0.0) * shrink
    hi = np.maximum(blocks.max(-1), 0.0) * shrink
    scales = _round_to((hi - lo) / qmax, scale_dtype)
    return scales, np.clip(np.round(-lo * _inverse(scales)), 0, qmax).astype(np.float32)


def _codes(blocks: np.ndarray, scales: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Nearest codes (as float32) for the given block parameters, clipped to [0, 2**bits)."""
    inv = _inverse(scales)
    return np.clip(np.round(blocks * inv[..., None]) + zero[..., None], 0, (1 << bits) - 1)


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


@dataclass(frozen=True)
class ChannelQuantized:
    """An (N, K) matrix as symmetric int8 codes with one scale per output row (channel):

        w[n, k] ~= codes[n, k] * scales[n]

    the layout of ONNX Runtime's integer GEMM (`MatMulIntegerToFloat`, B stored (K, N) int8 with a
    per-column scale), which multiplies it by int8 activations quantized per row (`activation_codes`).
    """

    codes: np.ndarray  # int8 (N, K), in [-127, 127]
    scales: np.ndarray  # float32 (N,)

    @property
    def N(self) -> int:  # noqa: N802
        return int(self.codes.shape[0])

    @property
    def K(self) -> int:  # noqa: N802
        return int(self.codes.shape[1])


def quantize_per_channel(w: np.ndarray, scale_dtype: np.dtype | type = np.float32) -> ChannelQuantized:
    """Round-to-nearest symmetric int8 codes of a 2-D matrix, one scale per row (its largest magnitude / 127)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    w = w.astype(np.float32, copy=False)
    scales = _round_to(np.abs(w).max(axis=1) / 127, scale_dtype)
    codes = np.clip(np.round(w * _inverse(scales)[:, None]), -127, 127).astype(np.int8)
    return ChannelQuantized(codes=codes, scales=scales)


def dequantize_per_channel(cq: ChannelQuantized) -> np.ndarray:
    return cq.codes.astype(np.float32) * cq.scales[:, None]


def activation_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the graph does to the activations of a `ChannelQuantized` product, per row of x (..., K):
    uint8 codes round(127 x / max|x|) + 128 and the row's max|x| (x ~= (codes - 128) * max|x| / 127)."""
    x = x.astype(np.float32, copy=False)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero row: 0/0, as in the graph; its scale is 0
        unit = np.nan_to_num(x / amax)  # float32 division, then QuantizeLinear's division by 1/127, as ORT does
    codes = np.clip(np.round(unit / np.float32(1 / 127)) + 128, 0, 255)
    return codes.astype(np.uint8), amax


def channel_stored_bytes(cq: ChannelQuantized, scale_bytes: int = 4) -> int:
    return cq.N * cq.K + cq.N * scale_bytes


def gptq_factor(hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor (float32) of the damped inverse Hessian, as `gptq_quantize` consumes it.

    `hessian` is X^T X (K, K) over a layer's calibration inputs X; only its upper triangle is read
    (calibrate.py fills no more). Inputs that were always zero (dead columns) get a unit diagonal;
    `damp` * mean(diag) is added for numerical stability. Shared by all layers that read the same
    input (q/k/v, gate/up), so it is computed separately.
    """
    from scipy.linalg import lapack

    # With J the order-reversing permutation, J H J = M M^T (M lower) gives H = R R^T with R = J M J
    # upper, so H^-1 = U^T U for the upper U = R^-1 = J M^-1 J: one Cholesky and one triangular
    # inverse (LAPACK potrf + trtri). The lower triangle of J H J is the upper one of H.
    # float32, as GPTQ's reference implementation computes it: 6.7 s at K = 11008 against 12 s in
    # float64 (numpy's cholesky + general inverse took 79); float64 only if float32 breaks down.
    h = np.asarray(hessian)
    for dtype, potrf, trtri in ((np.float32, lapack.spotrf, lapack.strtri),
                                (np.float64, lapack.dpotrf, lapack.dtrtri)):
        jhj = np.asfortranarray(h[::-1, ::-1], dtype=dtype)  # column-major for LAPACK: one copy
        diag = np.diag(jhj).astype(np.float64)
        diag[diag == 0] = 1.0  # dead input columns
        jhj[np.diag_indices_from(jhj)] = diag + damp * np.mean(diag)
        m, info = potrf(jhj, lower=1, clean=1, overwrite_a=1)
        if info == 0:
            m, info = trtri(m, lower=1, overwrite_c=1)
        del jhj
        if info == 0 and np.isfinite(np.diag(m)).all():
            return np.ascontiguousarray(m[::-1, ::-1], dtype=np.float32)
    raise np.linalg.LinAlgError(f"the damped Hessian is not positive definite (LAPACK info {info})")


def gptq_quantize(
    w: np.ndarray, factor: np.ndarray, bits: int, block_size: int, *, symmetric: bool,
    scale_dtype: np.dtype | type = np.float32,
) -> BlockQuantized:
    """GPTQ (Frantar et al., 2022) in the block layout of `quantize_blockwise`.

    Columns are quantized in order; each column's rounding error is spread over the columns not
    yet quantized through the inverse Hessian of the layer's inputs, so that the layer's outputs
    on the calibration data move least (weights alone may move more than with round-to-nearest).
    A block's scale and zero point are fixed from the error-updated weights when the loop enters
    it. `factor` is `gptq_factor` of the (K, K) Hessian.
    """
    _check(bits, block_size)
    K = w.shape[1]
    if factor.shape != (K, K):
        raise ValueError(f"factor has shape {factor.shape}, expected {(K, K)}")
    Kp = -(-K // block_size) * block_size
    if Kp == K:
        U = np.asarray(factor, dtype=np.float32)  # no copy of a float32 factor
    else:
        U = np.eye(Kp, dtype=np.float32)
        U[:K, :K] = factor  # padded columns: zero weights, identity factor (no error to spread)
    return _by_rows(w, lambda rows: _gptq_rows(rows, U, bits, block_size, symmetric, scale_dtype))


def _gptq_rows(
    w: np.ndarray, U: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype: np.dtype | type,  # noqa: N803
) -> BlockQuantized:
    N, K = w.shape
    k_blocks = -(-K // block_size)
    Kp = k_blocks * block_size
    # Columns of W are rows of WT: each per-column step below reads and updates contiguous rows (a
    # rank-1 update of a column-major slice took 25x longer: 580 us against 23 at N = 8192).
    WT = np.zeros((Kp, N), dtype=np.float32)
    WT[:K] = w.T
    codes = np.empty((Kp, N), dtype=np.uint8)
    scales = np.empty((N, k_blocks), dtype=np.float32)
    zeros = np.empty((N, k_blocks), dtype=np.float32)
    qmax = (1 << bits) - 1
    # Errors are spread lazily at two levels: column by column inside the current quantization block
    # (its next column needs them), as one product per block over the rest of the batch, and as one
    # product per batch over all later columns.
    lazy = max(256, block_size)  # a multiple of the block: blocks never straddle two batches
    for i in range(0, Kp, lazy):
        e = min(i + lazy, Kp)
        E = np.empty((e - i, N), dtype=np.float32)  # scaled errors of this batch's columns
        for s in range(i, e, block_size):
            t = s + block_size
            b = s // block_size
            sc, z = _range(WT[s:t].T[:, None, :], bits, symmetric, 1.0, scale_dtype)
            scales[:, b], zeros[:, b] = sc[:, 0], z[:, 0]
            inv, zb, sb = _inverse(scales[:, b]), zeros[:, b], scales[:, b]
            for c in range(s, t):
                q = np.clip(np.round(WT[c] * inv) + zb, 0, qmax)
                codes[c] = q
                err = (WT[c] - (q - zb) * sb) / U[c, c]
                WT[c + 1:t] -= U[c, c + 1:t, None] * err
                E[c - i] = err
            if t < e:
                WT[t:e] -= U[s:t, t:e].T @ E[s - i:t - i]
        if e < Kp:
            WT[e:] -= U[i:e, e:].T @ E
    zp = None if symmetric else zeros.astype(np.uint8)
    return BlockQuantized(q=np.ascontiguousarray(codes.T).reshape(N, k_blocks, block_size), scales=scales,
                          zero_points=zp, bits=bits, block_size=block_size, K=K)
