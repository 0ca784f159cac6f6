"""Block-wise quantization math (pure functions), and its agreement with ONNX Runtime's kernels."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from parscale.exporter.quant import math as qm


def _matrix(n: int = 48, k: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, size=(n, k)).astype(np.float32)
    w[3, :] = 0.0  # an all-zero row: zero blocks must stay exactly zero
    w[5, :40] = np.abs(w[5, :40])  # all-positive blocks: asymmetric ranges must still contain 0
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_asymmetric_round_trip_error_is_at_most_half_a_step(bits: int, block: int) -> None:
    w = _matrix()
    bq = qm.quantize_blockwise(w, bits, block, symmetric=False)
    assert bq.q.shape == (48, -(-100 // block), block) and bq.zero_points is not None
    assert bq.q.max() < 2**bits
    err = np.abs(qm.dequantize_blockwise(bq) - w).reshape(48, -1)
    step = np.repeat(bq.scales, block, axis=1)[:, :100]
    assert (err <= step / 2 + 1e-7).all()
    assert (qm.dequantize_blockwise(bq)[3] == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_round_trip_error_is_at_most_one_step(bits: int) -> None:
    """The extreme value is exact; only the opposite end may clip, by at most one step."""
    w = _matrix()
    bq = qm.quantize_blockwise(w, bits, 32, symmetric=True)
    assert bq.zero_points is None
    deq = qm.dequantize_blockwise(bq)
    step = np.repeat(np.abs(bq.scales), 32, axis=1)[:, :100]
    err = np.abs(deq - w)
    assert (err <= step + 1e-7).all()
    assert (err <= step / 2 + 1e-7).mean() > 0.99  # clipping is the rare exception
    blocks = np.pad(w, ((0, 0), (0, 28))).reshape(48, 4, 32)
    peak = np.abs(blocks).max(-1)
    deq_peak = np.abs(np.pad(deq, ((0, 0), (0, 28))).reshape(48, 4, 32)).max(-1)
    np.testing.assert_allclose(deq_peak, peak, rtol=1e-6)
    assert (deq[3] == 0).all()


def test_more_bits_and_smaller_blocks_are_more_accurate() -> None:
    w = _matrix(k=256)

    def rms(bits: int, block: int) -> float:
        bq = qm.quantize_blockwise(w, bits, block, symmetric=False)
        return float(np.sqrt(((qm.dequantize_blockwise(bq) - w) ** 2).mean()))

    assert rms(8, 32) < rms(4, 32) / 8
    assert rms(4, 32) < rms(4, 128)


def test_fp16_scales_are_the_ones_the_codes_were_chosen_for() -> None:
    w = _matrix()
    bq = qm.quantize_blockwise(w, 4, 32, symmetric=False, scale_dtype=np.float16)
    assert (bq.scales.astype(np.float16).astype(np.float32) == bq.scales).all()
    step = np.repeat(bq.scales, 32, axis=1)[:, :100]
    assert (np.abs(qm.dequantize_blockwise(bq) - w) <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    codes = np.random.default_rng(n).integers(0, 2**bits, size=(3, n), dtype=np.uint8)
    packed = qm.pack_bits(codes, bits)
    assert packed.shape == (3, -(-n * bits // 8))
    np.testing.assert_array_equal(qm.unpack_bits(packed, bits, n), codes)


def test_four_bit_packing_is_low_nibble_first() -> None:
    np.testing.assert_array_equal(qm.pack_bits(np.array([1, 2, 15], np.uint8), 4), [0x21, 0x0F])


@pytest.mark.parametrize(("bits", "symmetric", "expected"), [
    (4, False, 4 + 32 / 32 + 4 / 32), (4, True, 4 + 32 / 32), (8, False, 8 + 32 / 32 + 8 / 32), (8, True, 9.0),
])
def test_bits_per_weight(bits: int, symmetric: bool, expected: float) -> None:
    bq = qm.quantize_blockwise(np.ones((8, 256), np.float32), bits, 32, symmetric=symmetric)
    assert qm.bits_per_weight(bq) == pytest.approx(expected)
    assert qm.bits_per_weight(bq, scale_bytes=2) == pytest.approx(expected - 16 / 32)


def test_rejects_unsupported_parameters() -> None:
    w = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match="bits"):
        qm.quantize_blockwise(w, 3, 32, symmetric=True)
    with pytest.raises(ValueError, match="block_size"):
        qm.quantize_blockwise(w, 4, 24, symmetric=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [32, 64])
def test_onnxruntime_kernels_decode_our_layout(bits: int, symmetric: bool, block: int) -> None:
    """MatMulNBits (3-D codes) and GatherBlockQuantized (the same bytes as 2-D) both read our packing.

    K=80 is not a multiple of 64: the padded tail block must be ignored by MatMulNBits and come
    back as padding columns from the Gather.
    """
    n, k = 50, 80
    w = _matrix(n, k, seed=bits + block)
    bq = qm.quantize_blockwise(w, bits, block, symmetric=symmetric)
    codes = qm.packed_weight(bq)
    inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(codes.reshape(n, -1), "table"),
             numpy_helper.from_array(bq.scales, "scales")]
    extra = []
    if not symmetric:
        inits.append(numpy_helper.from_array(qm.packed_zero_points(bq), "zp"))
        extra = ["zp"]
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B", "scales", *extra], ["y"], domain="com.microsoft",
                         K=k, N=n, bits=bits, block_size=block, accuracy_level=0),
        helper.make_node("GatherBlockQuantized", ["table", "ids", "scales", *extra], ["e"], domain="com.microsoft",
                         bits=bits, block_size=block, gather_axis=0, quantize_axis=1),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, k)).astype(np.float32)
    ids = np.array([0, 3, 49, 5])
    y, e = sess.run(None, {"x": x, "ids": ids})
    deq = qm.dequantize_blockwise(bq)
    np.testing.assert_allclose(y, x @ deq.T, atol=1e-5)
    np.testing.assert_array_equal(e[:, :k], deq[ids])


def test_gptq_with_an_identity_hessian_is_round_to_nearest() -> None:
    w = _matrix(k=96)
    factor = qm.gptq_factor(np.eye(96))
    for symmetric in (False, True):
        g = qm.gptq_quantize(w, factor, 4, 32, symmetric=symmetric)
        r = qm.quantize_blockwise(w, 4, 32, symmetric=symmetric)
        np.testing.assert_array_equal(g.q, r.q)
        np.testing.assert_allclose(g.scales, r.scales)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64])
def test_gptq_lowers_the_output_error_on_correlated_inputs(bits: int, block: int) -> None:
    """The point of GPTQ: X @ W^T moves less than with round-to-nearest (K=80: a padded tail block)."""
    rng = np.random.default_rng(0)
    k = 80
    x = rng.normal(size=(2048, k)) @ rng.normal(size=(k, k)) * 0.3 + rng.normal(size=k)  # correlated, offset
    w = _matrix(64, k, seed=1)
    g = qm.gptq_quantize(w, qm.gptq_factor(x.T @ x), bits, block, symmetric=False)
    r = qm.quantize_blockwise(w, bits, block, symmetric=False)
    assert g.q.shape == r.q.shape and g.q.max() < 2**bits

    def out_err(bq: qm.BlockQuantized) -> float:
        return float(np.square(x @ (qm.dequantize_blockwise(bq) - w).T).mean())

    assert out_err(g) < 0.8 * out_err(r)


def test_clip_search_never_raises_the_weight_error() -> None:
    w = _matrix(k=256)
    for symmetric in (False, True):
        plain = qm.quantize_blockwise(w, 4, 32, symmetric=symmetric)
        clipped = qm.quantize_blockwise(w, 4, 32, symmetric=symmetric, clip_search=True)
        e_plain = np.square(qm.dequantize_blockwise(plain) - w).reshape(48, -1, 32).sum(-1)
        e_clip = np.square(qm.dequantize_blockwise(clipped) - w).reshape(48, -1, 32).sum(-1)
        assert (e_clip <= e_plain + 1e-12).all() and e_clip.sum() < e_plain.sum()


def test_gptq_factor_is_the_upper_cholesky_factor_of_the_damped_inverse() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 24))
    h = x.T @ x
    h[5, :] = h[:, 5] = 0.0  # a dead input
    u = qm.gptq_factor(np.triu(h) + np.tril(np.full_like(h, np.nan), -1), damp=0.01)  # one triangle is read
    assert u.dtype == np.float32 and np.allclose(u, np.triu(u)) and (np.diag(u) > 0).all()
    damped = h.copy()
    damped[5, 5] = 1.0
    damped[np.diag_indices(24)] += 0.01 * np.mean(np.diag(damped))
    inverse = np.linalg.inv(damped)
    u64 = u.astype(np.float64)
    np.testing.assert_allclose(u64.T @ u64, inverse, rtol=0, atol=1e-5 * np.abs(inverse).max())


@pytest.mark.parametrize("method", ["rtn", "rtn-clip", "gptq"])
def test_row_chunks_give_the_same_result(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large matrices are quantized a few rows at a time (memory); the result must not depend on it."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(37, 80)).astype(np.float32)
    x = rng.normal(size=(200, 80))
    factor = qm.gptq_factor(x.T @ x)

    def run() -> qm.BlockQuantized:
        if method == "gptq":
            return qm.gptq_quantize(w, factor, 4, 32, symmetric=False)
        return qm.quantize_blockwise(w, 4, 32, symmetric=False, clip_search=method == "rtn-clip")

    whole = run()
    monkeypatch.setattr(qm, "CHUNK_BYTES", 5 * 4 * 80)  # 5 rows at a time: 8 chunks, the last one short
    chunked = run()
    np.testing.assert_array_equal(whole.q, chunked.q)
    np.testing.assert_array_equal(whole.scales, chunked.scales)
    np.testing.assert_array_equal(whole.zero_points, chunked.zero_points)


def test_per_channel_round_trip_error_is_at_most_half_a_step() -> None:
    w = _matrix()
    cq = qm.quantize_per_channel(w)
    assert cq.codes.dtype == np.int8 and cq.scales.shape == (w.shape[0],)
    err = np.abs(qm.dequantize_per_channel(cq) - w)
    assert (err <= cq.scales[:, None] / 2 + 1e-9).all()
    assert (qm.dequantize_per_channel(cq)[3] == 0).all()  # the all-zero row stays zero (scale 0)
    assert qm.channel_stored_bytes(cq) == w.size + 4 * w.shape[0]


def test_activation_codes_round_trip_per_row() -> None:
    x = np.random.default_rng(2).normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 1] *= 100  # an outlier row does not coarsen the others
    x[1, 2] = 0.0  # an all-zero row: codes 128, max 0
    codes, amax = qm.activation_codes(x)
    back = (codes.astype(np.float32) - 128) * amax / 127
    assert (np.abs(back - x) <= amax / 254 + 1e-6).all()
    assert (codes[1, 2] == 128).all() and amax[1, 2, 0] == 0


def test_the_integer_gemm_nodes_compute_the_per_row_emulation() -> None:
    """The quantizer's MatMulIntegerToFloat chain equals (codes - 128) * max|row| / 127 @ (W codes * scales),
    an all-zero input row gives zero (not NaN), and the output is x @ W within the two roundings."""
    import onnx

    from parscale.exporter.quant.policy import QuantReport, QuantScheme
    from parscale.exporter.quant.rewrite import _matmul_integer

    n, k = 40, 96
    w = _matrix(n, k, seed=7)
    cq = qm.quantize_per_channel(w)
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])])
    matmul = helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")
    graph.node.extend(_matmul_integer(graph, matmul, cq, "proj", QuantReport(QuantScheme(bits=8))))
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).normal(size=(2, 3, k)).astype(np.float32)
    x[0, 1] *= 50
    x[1, 0] = 0.0
    y = sess.run(None, {"x": x})[0]
    codes, amax = qm.activation_codes(x)
    emulated = ((codes.astype(np.float32) - 128) * amax / 127) @ qm.dequantize_per_channel(cq).T
    np.testing.assert_allclose(y, emulated, rtol=1e-4, atol=1e-6)
    assert np.isfinite(y).all() and (y[1, 0] == 0).all()
    np.testing.assert_allclose(y, x @ w.T, atol=0.02 * np.abs(x @ w.T).max())
