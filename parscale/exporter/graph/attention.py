"""Attention: ONNX Runtime's GroupQueryAttention over the P streams as heads, the learned prefix rows
in front of the first step's keys and values, and the key bias. The one place to swap the attention
operator: subclass `Attention` and override `operator` (the node) or `step_values` (what it reads).

GroupQueryAttention rotates every row by its cache index (its position_ids input follows only each
row's first position, so left padding cannot be expressed through it): a real token at position t
of a sequence with `pad` left-padding tokens sits at row N + pad + t, and prefix row j is stored
rotated by RoPE(N + pad - j), so that every score equals the reference's (no RoPE on the prefix,
token positions from 0; RoPE depends only on differences). Attention to padding is masked by an
additive bias; the prefix is never masked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from onnx import TensorProto

from parscale import contract
from parscale.exporter.graph.builder import MS_DOMAIN
from parscale.exporter.graph.step_values import FirstStep, StepValues
from parscale.exporter.graph.weights import WeightWriter
from parscale.modeling.model import ParScaleForCausalLM, rope_cos_sin

_INT_MAX = np.iinfo(np.int64).max
PerP = Callable[[Callable[[int], list[str]], list[str]], list[str]]  # streams.ParallelStreams.per_P
Rows = Callable[[str, int], str]  # streams.ParallelStreams.rows


class Attention:
    """Each layer's attention of the graph of `models` (P -> module over one backbone)."""

    def __init__(self, w: WeightWriter, models: dict[int, ParScaleForCausalLM], per_P: PerP,  # noqa: N803
                 rows: Rows) -> None:
        self.w, self.b, self.models, self.Ps = w, w.b, models, sorted(models)
        self.multi, self.per_P, self.rows = len(models) > 1, per_P, rows
        c = models[self.Ps[-1]].cfg
        self.cfg, self.H, self.Hkv, self.D, self.N = c, c.num_attention_heads, c.num_key_value_heads, c.head_dim, \
            c.n_prefix

    # ------------------------------------------------------------------ shared by every layer

    def step_values(self, ids: str, mask: str, streams: str | None) -> StepValues:
        """GQA lengths, the padding bias and rotary caches; and the first step's prefix values, computed
        inside an `If` so that decode steps skip them. `streams`: [P] of a multi-P graph."""
        b, w, N = self.b, self.w, self.N
        batch = b.op("Shape", ids, start=0, end=1)  # [b]
        seq = b.op("Shape", ids, start=1, end=2)  # [s]
        mask_len = b.op("Shape", mask, start=1, end=2)  # [T]
        total = b.op("Add", mask_len, b.const([N])) if N else mask_len
        total32 = w.cast(total, TensorProto.INT32)
        total_scalar = b.op("Squeeze", total32, b.const([0]))
        seqlens = b.op("Expand", b.op("Sub", total32, b.const([1], np.int32)), batch)  # (b,)
        # Additive bias over keys (b, 1, s, N+T): 0 for prefix rows and real tokens, a large negative
        # for padding (finite: a padded row with no visible key stays finite).
        neg = float(np.finfo(w.np_dtype).min)
        padded = b.op("Equal", mask, b.const(0))
        pad_bias = b.op("Where", padded, b.const(neg, w.np_dtype), b.const(0.0, w.np_dtype))  # (b, T)
        bias = self.key_bias(batch, pad_bias, seq, 0.0)
        bias_p1 = self.key_bias(batch, pad_bias, seq, neg) if N and 1 in self.Ps else None
        # GroupQueryAttention rotates by cache index (N prefix rows, then left padding and tokens).
        positions = torch.arange(self.cfg.max_position_embeddings + N)[None]
        cos, sin = rope_cos_sin(positions, self.D, self.cfg.rope_theta)  # (1, rows, D)
        cos_t = b.weight("rope.cos_cache", cos[0, :, : self.D // 2].to(w.dtype).numpy())
        sin_t = b.weight("rope.sin_cache", sin[0, :, : self.D // 2].to(w.dtype).numpy())
        first, first_step = None, None
        if N:
            first = b.op("Equal", mask_len, seq)  # the first step (no past) writes the prefix rows
            names = ["expand_rows", "prefix_pos", "bias_first", *(["bias_first_p1"] if 1 in self.Ps else []),
                     *(f"zero_queries_p{P}" for P in self.Ps)]
            values = dict(zip(names, b.branch(
                first, lambda: self._first_step_values(batch, mask, seq, pad_bias, neg),
                lambda: [b.op("Identity", b.const(np.zeros(0), dt)) for dt in
                         [np.int64, np.int64] + [w.np_dtype] * (len(names) - 2)],
                [b.fresh(n) for n in names]), strict=True))
            first_step = FirstStep(values["expand_rows"], values["prefix_pos"], values["bias_first"],
                                   values.get("bias_first_p1"), {P: values[f"zero_queries_p{P}"] for P in self.Ps})
        return StepValues(streams=streams, batch=batch, total=total_scalar, seqlens=seqlens, bias=bias,
                          bias_p1=bias_p1, cos=cos_t, sin=sin_t, first=first, first_step=first_step)

    def _first_step_values(self, batch: str, mask: str, seq: str, pad_bias: str, neg: float) -> list[str]:
        """The first step's shared prefix values (the `then` branch of step_values' `If`)."""
        b, N = self.b, self.N
        expand_rows = b.op("Concat", batch, b.const([1, 1]), axis=0)  # [b, 1, 1]
        # Prefix row j of sequence i is stored rotated by RoPE(N + pad_i - j) (pad_i: its left
        # padding), so that GroupQueryAttention's rotation by cache index leaves every prefix
        # score as the reference's (no RoPE on the prefix, real tokens at positions from 0).
        pads = b.op("Sub", seq, b.op("ReduceSum", mask, b.const([1]), keepdims=1))  # (b, 1)
        j = b.const(np.arange(N)[None])  # (1, N)
        prefix_pos = b.op("Max", b.op("Sub", b.op("Add", pads, b.const(N)), j), b.const(0))  # (b, N)
        queries = b.op("Add", seq, b.const([N]))  # N zero query rows in front of the tokens
        biases = [self.key_bias(batch, pad_bias, queries, 0.0)]
        if 1 in self.Ps:
            biases.append(self.key_bias(batch, pad_bias, queries, neg))
        # The zero query rows put in front of the first step's queries (their outputs are dropped).
        zeros = [b.op("Expand", b.const(np.zeros((1, N, P * self.H * self.D)), self.w.np_dtype), expand_rows)
                 for P in self.Ps]
        return [expand_rows, prefix_pos, *biases, *zeros]

    def key_bias(self, batch: str, pad_bias: str, queries: str, prefix_value: float) -> str:
        """(b, 1, queries, N+T): `prefix_value` over the N prefix columns, then the padding bias (b, T)."""
        b, N = self.b, self.N
        if N:
            prefix_cols = b.op("Expand", b.const(np.full((1, N), prefix_value), self.w.np_dtype),
                               b.op("Concat", batch, b.const([N]), axis=0))
            pad_bias = b.op("Concat", prefix_cols, pad_bias, axis=1)
        bias = b.op("Unsqueeze", pad_bias, b.const([1, 2]))  # (b, 1, 1, N+T)
        return b.op("Expand", bias, b.op("Concat", b.const([1, 1]), queries, b.const([1]), axis=0))

    # ------------------------------------------------------------------ one layer

    def __call__(self, i: int, x: str, sv: StepValues) -> str:
        """Layer i's attention of (b, s*P, h): packed QKV projection, attention, output projection."""
        attn = self.models[self.Ps[-1]].model.layers[i].self_attn
        prefix = f"model.layers.{i}"
        w = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
        bias = torch.cat((attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))
        qkv = self.w.linear(x, w, f"{prefix}.self_attn.qkv_proj", f"{prefix}.self_attn.q_proj", bias)
        presents = [contract.present_key(i), contract.present_value(i)]
        if self.multi:
            b = self.b
            out = self.per_P(lambda p: self.streams_as_heads(qkv, i, p, sv, [b.fresh("present_k"),
                                                                            b.fresh("present_v")]),
                             [b.fresh("attn"), *presents])[0]
        else:
            out = self.streams_as_heads(qkv, i, self.Ps[0], sv, presents)[0]
        out = self.rows(out, self.H * self.D)  # (b, s*P, H*D)
        return self.w.linear(out, attn.o_proj.weight, f"{prefix}.self_attn.o_proj", f"{prefix}.self_attn.o_proj")

    def streams_as_heads(self, qkv: str, i: int, P: int, sv: StepValues, presents: list[str]) -> list[str]:  # noqa: N803
        """Attention over the P streams as heads: [(b, s*P, H*D), present key, present value].

        With a prefix, an `If` on the first step: its `then` branch puts the prefix rows in front of
        the keys and values (and zero rows in front of the queries); decode steps run the bare
        operator of the `else` branch."""
        b, H, Hkv, D = self.b, self.H, self.Hkv, self.D
        if P == 1 and not self.N:  # the projection's output is already GroupQueryAttention's packed QKV layout
            return self.operator(qkv, "", "", i, P, sv, sv.bias, presents)
        q, k, v = b.ops("Split", qkv, b.const([H * D, Hkv * D, Hkv * D]), outputs=3, axis=-1)
        if P > 1:
            q = b.op("Reshape", q, b.const([0, -1, P * H * D]))  # (b, s, P*H*D): head p*H + h
            k = b.op("Reshape", k, b.const([0, -1, P * Hkv * D]))  # (b, s, P*Hkv*D)
            v = b.op("Reshape", v, b.const([0, -1, P * Hkv * D]))
        if sv.first is None:
            out, key, value = self.operator(q, k, v, i, P, sv, sv.bias, presents)
        else:
            bias = sv.bias if P > 1 else sv.bias_p1
            assert bias is not None

            def fresh() -> list[str]:
                return [b.fresh("present_k"), b.fresh("present_v")]

            out, key, value = b.branch(sv.first, lambda: self.first_step(q, k, v, i, P, sv, fresh()),
                                       lambda: self.operator(q, k, v, i, P, sv, bias, fresh()),
                                       [b.fresh("attn"), *presents])
        if P > 1:
            out = b.op("Reshape", out, b.const([0, -1, H * D]))  # (b, s*P, H*D)
        return [out, key, value]

    def first_step(self, q: str, k: str, v: str, i: int, P: int, sv: StepValues,  # noqa: N803
                   presents: list[str]) -> list[str]:
        """The first step: the N prefix rows in front of keys and values, N zero rows in front of the
        queries (their outputs dropped)."""
        b, first = self.b, sv.first_step
        assert first is not None
        attn = self.models[P].model.layers[i].self_attn
        name = f"model.layers.{i}.self_attn"
        tag = f".p{P}" if self.multi else ""  # each P's own prefix tensors
        pk, pv = (attn.prefix_k, attn.prefix_v) if P > 1 else (None, None)
        q = b.op("Concat", first.zero_queries[P], q, axis=1)
        k = b.op("Concat", self.prefix_rows(pk, f"{name}.prefix_k{tag}", sv, rotate=True), k, axis=1)
        v = b.op("Concat", self.prefix_rows(pv, f"{name}.prefix_v{tag}", sv, rotate=False), v, axis=1)
        bias = first.bias if P > 1 else first.bias_p1
        assert bias is not None
        out, key, value = self.operator(q, k, v, i, P, sv, bias, presents)
        return [b.op("Slice", out, b.const([self.N]), b.const([_INT_MAX]), b.const([1])), key, value]

    def prefix_rows(self, param: torch.Tensor | None, name: str, sv: StepValues, *, rotate: bool) -> str:
        """(b, N, P*Hkv*D): the prefix rows put in front of the first step's keys or values.

        `param` None: P=1 beside prefixed P, whose N rows are zeros (and masked)."""
        b, first = self.b, sv.first_step
        assert first is not None
        if param is None:
            table = b.const(np.zeros((1, self.N, self.Hkv * self.D)), self.w.np_dtype)
        else:
            rows = param.detach().permute(2, 0, 1, 3).reshape(1, self.N, -1)  # (1, N, P*Hkv*D), head p*Hkv + h
            table = self.w.tensor(name, rows)
        rows = b.op("Expand", table, first.expand_rows)
        if rotate and param is not None:
            rows = b.op("RotaryEmbedding", rows, first.prefix_pos, sv.cos, sv.sin, domain=MS_DOMAIN,
                        num_heads=param.shape[0] * self.Hkv)
        return rows

    def operator(self, q: str, k: str, v: str, i: int, P: int, sv: StepValues, bias: str,  # noqa: N803
                 presents: list[str]) -> list[str]:
        """The attention node: one GroupQueryAttention, the P streams as heads, rotary inside, writing
        the cache in place: [(b, s*P or s, heads*D), present key, present value]."""
        tag = f".p{P}" if self.multi else ""
        return self.b.ops(
            "GroupQueryAttention", q, k, v, contract.past_key(i), contract.past_value(i), sv.seqlens, sv.total,
            sv.cos, sv.sin, "", bias,  # no position_ids: rotation by cache index
            outputs=[self.b.fresh("attn"), *presents], domain=MS_DOMAIN, num_heads=P * self.H,
            kv_num_heads=P * self.Hkv, do_rotary=1, name=f"model.layers.{i}.self_attn.gqa{tag}",
        )
