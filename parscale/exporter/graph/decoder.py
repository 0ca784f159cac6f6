"""The fused decoder graph, written node by node from the PyTorch module's weights.

Why written and not traced: the traced graph ran about 1,255 nodes per step (attention as
MatMul/Softmax chains, the cache grown by Concat). Here each layer is one packed QKV projection,
one `com.microsoft.GroupQueryAttention` (rotary inside, P streams as heads: num_heads = P*H,
kv_num_heads = P*Hkv), one packed gate/up projection, and (Skip)SimplifiedLayerNormalization:
about 16 nodes per layer at P=1 and 27 with the prefix (0.5B: 441 and 736 nodes). The PyTorch
module stays the reference the graph is validated against.

Hidden states are (b, s*P, h): token-major, stream-minor, so that a (b, s, P*H*D) view of the
query projection puts stream p's heads at p*H + h, which is the cache layout of the contract.

The prefix (ParScale's learned keys/values, `parscale_n_tokens` per stream and layer) lives in
the first N rows of the KV cache: on the first step (mask length == new tokens) N prefix rows are
put in front of the keys/values and N zero rows in front of the queries (their outputs are
dropped). GroupQueryAttention rotates every row by its cache index (its position_ids input
follows only each row's first position, so left padding cannot be expressed through it): a real
token at position t of a sequence with `pad` left-padding tokens sits at row N + pad + t, and
prefix row j is stored rotated by RoPE(N + pad - j), so that every score equals the reference's
(no RoPE on the prefix, token positions from 0; RoPE depends only on differences). Attention to
padding is masked by an additive bias; the prefix is never masked. Cache rows = N + tokens: a
runtime sizes a shared buffer by that.

Several P over one backbone (head sets, `parscale.modeling.heads`) make one graph: the backbone's
nodes (and their weights) appear once, and P is read from the cache's heads (P*Hkv). Only the
P-specific parts (each layer's GroupQueryAttention, whose head counts are attributes, with its
prefix rows; the aggregation) sit in nested `If` branches, one per P. A runtime picks P by the
cache it binds; P=1 there keeps N masked rows in front so that all P share one cache layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from parscale import contract
from parscale.errors import ParScaleError
from parscale.exporter.graph.builder import EMBED_WEIGHT, MS_DOMAIN, QUANT_KEY, GraphBuilder
from parscale.modeling.model import ParScaleForCausalLM, rope_cos_sin

ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16}
LM_HEAD = "lm_head"
_INT_MAX = np.iinfo(np.int64).max


def check_supported(head_dim: int) -> None:
    """GroupQueryAttention's CPU kernel rotates heads whose size is a multiple of 16 only."""
    if head_dim % 16:
        raise ParScaleError(f"head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's "
                            "GroupQueryAttention needs; every published Qwen2 / ParScale shape has 64 or 128")


def build_decoder(
    model: ParScaleForCausalLM | dict[int, ParScaleForCausalLM], folder: Path, *, dtype: torch.dtype, opset: int,
    external_threshold: int, metadata: dict[str, str] | None = None,
) -> int:
    """Write the fused graph of `model` to `folder/model.onnx` (+ data); returns its weight bytes.

    `model` may be a dict P -> module over one shared backbone: one graph then serves every P.
    Weights are converted to `dtype` one tensor at a time. MatMuls that quantization may replace
    carry `QUANT_KEY` metadata naming the weight and the calibration statistics it reads.
    """
    models = model if isinstance(model, dict) else {model.cfg.P: model}
    check_supported(next(iter(models.values())).cfg.head_dim)
    g = _Decoder(models, GraphBuilder(folder), dtype)
    g.build()
    g.b.save(opset, external_threshold=external_threshold, metadata=metadata, node_metadata=g.quant_meta)
    return g.b.external_bytes


class _Decoder:
    def __init__(self, models: dict[int, ParScaleForCausalLM], builder: GraphBuilder, dtype: torch.dtype) -> None:
        self.models, self.Ps = models, sorted(models)
        self.multi = len(models) > 1
        self.m = models[self.Ps[-1]]  # the backbone, shared by all
        self.cfg, self.b, self.dtype = self.m.cfg, builder, dtype
        self.np_dtype = NP_DTYPE[dtype]
        self.quant_meta: dict[str, dict[str, str]] = {}
        c = self.cfg
        self.P, self.H, self.Hkv, self.D = c.P, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.h, self.N = c.hidden_size, c.n_prefix

    # ------------------------------------------------------------------ helpers

    def tensor(self, name: str, t: torch.Tensor) -> str:
        return self.b.weight(name, t.detach().to(self.dtype).contiguous().numpy())

    def linear(self, x: str, weight: torch.Tensor, name: str, calib: str | None,
               bias: torch.Tensor | None = None) -> str:
        """x @ W^T (+ bias): W (N, K) stored transposed as (K, N), as quantization expects."""
        w = self.b.weight(name + ".weight", weight.detach().to(self.dtype).T.contiguous().numpy())
        y = self.b.op("MatMul", x, w, name=name)
        if calib is not None:
            self.quant_meta[self.b.nodes[-1].name] = {QUANT_KEY: f"{name}.weight|{calib}"}
        if bias is not None:
            y = self.b.op("Add", y, self.tensor(name + ".bias", bias))
        return y

    def shape_of(self, x: str, start: int, end: int) -> str:
        return self.b.op("Shape", x, start=start, end=end)

    def cast(self, x: str, to: int) -> str:
        return self.b.op("Cast", x, to=to)

    # ------------------------------------------------------------------ graph

    def build(self) -> None:
        b, cfg, n = self.b, self.cfg, self.cfg.num_hidden_layers
        fdt = ONNX_DTYPE[self.dtype]
        ids = b.input(contract.INPUT_IDS, TensorProto.INT64, [contract.BATCH, contract.SEQ])
        mask = b.input(contract.ATTENTION_MASK, TensorProto.INT64, [contract.BATCH, contract.TOTAL])
        b.input(contract.POSITION_IDS, TensorProto.INT64, [contract.BATCH, contract.SEQ])
        heads: int | str = contract.CACHE_HEADS if self.multi else cfg.cache_heads
        for name in contract.past_names(n):
            b.input(name, fdt, [contract.BATCH, heads, contract.PAST, cfg.head_dim])
        keep = contract.NUM_LOGITS_TO_KEEP
        b.inputs.append(helper.make_tensor_value_info(keep, TensorProto.INT64, []))
        b.initializers.append(numpy_helper.from_array(np.array(1, np.int64), keep))  # optional: 1 = the last

        self.common(ids, mask)
        x = self.embed(ids)  # (b, s*P, h)
        residual, delta = x, None
        for i, layer in enumerate(self.m.model.layers):
            prefix = f"model.layers.{i}"
            if delta is None:
                normed = b.op("SimplifiedLayerNormalization", x, self.tensor(f"{prefix}.input_layernorm.weight",
                              layer.input_layernorm.weight), axis=-1, epsilon=cfg.rms_norm_eps, stash_type=1)
            else:
                normed, residual = self.skip_norm(delta, residual, layer.input_layernorm.weight,
                                                  f"{prefix}.input_layernorm.weight")
            attn = self.attention(normed, layer.self_attn, i, prefix)
            for name in (contract.present_key(i), contract.present_value(i)):
                b.output(name, fdt, [contract.BATCH, heads, contract.TOTAL, cfg.head_dim])
            normed, residual = self.skip_norm(attn, residual, layer.post_attention_layernorm.weight,
                                              f"{prefix}.post_attention_layernorm.weight")
            delta = self.mlp(normed, layer.mlp, prefix)
        assert delta is not None
        y, _ = self.skip_norm(delta, residual, self.m.model.norm.weight, "model.norm.weight")
        y = self.keep_last(y, keep)  # (b, k*P, h)
        if self.multi:
            y = self.switch(lambda p: [self.aggregate(y, p) if p > 1 else b.op("Identity", y)], [b.fresh("mixed")])[0]
        elif self.P > 1:
            y = self.aggregate(y, self.P)
        kept = self.lm_head(y)  # (b, k, vocab): one LM head over the kept positions only
        if self.dtype != torch.float32:
            kept = self.cast(kept, TensorProto.FLOAT)
        b.nodes[-1].output[0] = kept = contract.KEPT_LOGITS
        b.op("Slice", kept, b.const([-1]), b.const([_INT_MAX]), b.const([1]), outputs=[contract.LOGITS])
        axes = contract.axes(n)
        b.outputs[:0] = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [*axes[name][:2], cfg.vocab_size])
                         for name in (contract.LOGITS, contract.KEPT_LOGITS)]

    def common(self, ids: str, mask: str) -> None:
        """Values every layer shares this step: GQA lengths, the padding bias, rotary caches; and the
        first step's prefix values (`self.first`), computed inside an `If` so that decode steps skip them."""
        b, N = self.b, self.N
        if self.multi:  # P from the cache the runtime binds: (b, P*Hkv, rows, D)
            self.P_t = b.op("Div", self.shape_of(contract.past_key(0), 1, 2), b.const([self.Hkv]))  # [P]
        self.batch = self.shape_of(ids, 0, 1)  # [b]
        seq = self.shape_of(ids, 1, 2)  # [s]
        mask_len = self.shape_of(mask, 1, 2)  # [T]
        total = b.op("Add", mask_len, b.const([N])) if N else mask_len
        total32 = self.cast(total, TensorProto.INT32)
        self.total = b.op("Squeeze", total32, b.const([0]))  # scalar
        self.seqlens = b.op("Expand", b.op("Sub", total32, b.const([1], np.int32)), self.batch)  # (b,)
        # Additive bias over keys (b, 1, s, N+T): 0 for prefix rows and real tokens, a large negative
        # for padding (finite: a padded row with no visible key stays finite).
        neg = float(np.finfo(self.np_dtype).min)
        padded = b.op("Equal", mask, b.const(0))
        pad_bias = b.op("Where", padded, b.const(neg, self.np_dtype), b.const(0.0, self.np_dtype))  # (b, T)
        self.bias = self.key_bias(pad_bias, seq, 0.0)
        if N and 1 in self.Ps:  # P=1 beside prefixed P: its N rows exist but are masked
            self.bias_p1 = self.key_bias(pad_bias, seq, neg)
        # GroupQueryAttention rotates by cache index (N prefix rows, then left padding and tokens).
        positions = torch.arange(self.cfg.max_position_embeddings + N)[None]
        cos, sin = rope_cos_sin(positions, self.D, self.cfg.rope_theta)  # (1, rows, D)
        self.cos = self.b.weight("rope.cos_cache", cos[0, :, : self.D // 2].to(self.dtype).numpy())
        self.sin = self.b.weight("rope.sin_cache", sin[0, :, : self.D // 2].to(self.dtype).numpy())
        if N:
            self.first = b.op("Equal", mask_len, seq)  # the first step (no past) writes the prefix rows
            names = ["expand_rows", "prefix_pos", "bias_first", *(["bias_first_p1"] if 1 in self.Ps else []),
                     *(f"zero_queries_p{P}" for P in self.Ps)]
            values = b.branch(self.first, lambda: self.first_step_values(mask, seq, pad_bias, neg),
                              lambda: [b.op("Identity", b.const(np.zeros(0), dt)) for dt in
                                       [np.int64, np.int64] + [self.np_dtype] * (len(names) - 2)],
                              [b.fresh(n) for n in names])
            self.first_values = dict(zip(names, values, strict=True))

    def first_step_values(self, mask: str, seq: str, pad_bias: str, neg: float) -> list[str]:
        """The first step's shared prefix values (the `then` branch of common's `If`)."""
        b, N = self.b, self.N
        expand_rows = b.op("Concat", self.batch, b.const([1, 1]), axis=0)  # [b, 1, 1]
        # Prefix row j of sequence i is stored rotated by RoPE(N + pad_i - j) (pad_i: its left
        # padding), so that GroupQueryAttention's rotation by cache index leaves every prefix
        # score as the reference's (no RoPE on the prefix, real tokens at positions from 0).
        pads = b.op("Sub", seq, b.op("ReduceSum", mask, b.const([1]), keepdims=1))  # (b, 1)
        j = b.const(np.arange(N)[None])  # (1, N)
        prefix_pos = b.op("Max", b.op("Sub", b.op("Add", pads, b.const(N)), j), b.const(0))  # (b, N)
        queries = b.op("Add", seq, b.const([N]))  # N zero query rows in front of the tokens
        biases = [self.key_bias(pad_bias, queries, 0.0)]
        if 1 in self.Ps:
            biases.append(self.key_bias(pad_bias, queries, neg))
        # The zero query rows put in front of the first step's queries (their outputs are dropped).
        zeros = [b.op("Expand", b.const(np.zeros((1, N, P * self.H * self.D)), self.np_dtype), expand_rows)
                 for P in self.Ps]
        return [expand_rows, prefix_pos, *biases, *zeros]

    def key_bias(self, pad_bias: str, queries: str, prefix_value: float) -> str:
        """(b, 1, queries, N+T): `prefix_value` over the N prefix columns, then the padding bias (b, T)."""
        b, N = self.b, self.N
        if N:
            prefix_cols = b.op("Expand", b.const(np.full((1, N), prefix_value), self.np_dtype),
                               b.op("Concat", self.batch, b.const([N]), axis=0))
            pad_bias = b.op("Concat", prefix_cols, pad_bias, axis=1)
        bias = b.op("Unsqueeze", pad_bias, b.const([1, 2]))  # (b, 1, 1, N+T)
        return b.op("Expand", bias, b.op("Concat", b.const([1, 1]), queries, b.const([1]), axis=0))

    def switch(self, body: Callable[[int], list[str]], outputs: list[str]) -> list[str]:
        """`body(P)`'s outputs for the P the cache holds (GraphBuilder.switch over self.Ps)."""
        return self.b.switch(self.P_t, self.Ps, body, outputs)

    def embed(self, ids: str) -> str:
        b, P, h = self.b, self.P, self.h
        x = b.op("Gather", self.tensor(EMBED_WEIGHT, self.m.model.embed_tokens.weight), ids, name="embed_tokens")
        self.quant_meta[b.nodes[-1].name] = {QUANT_KEY: f"{EMBED_WEIGHT}|"}
        if not self.multi and P == 1:
            return x
        x = b.op("Unsqueeze", x, b.const([2]))  # (b, s, 1, h)
        if self.multi:
            streams = b.op("Concat", b.const([1, 1]), self.P_t, b.const([1]), axis=0)
        else:
            streams = b.const([1, 1, P, 1])
        x = b.op("Expand", x, streams)  # (b, s, P, h): every stream reads the same embedding
        return b.op("Reshape", x, b.const([0, -1, h]))  # (b, s*P, h)

    def skip_norm(self, delta: str, residual: str, weight: torch.Tensor, name: str) -> tuple[str, str]:
        """(normed, residual + delta) in one SkipSimplifiedLayerNormalization."""
        out = self.b.ops("SkipSimplifiedLayerNormalization", delta, residual, self.tensor(name, weight),
                         outputs=[self.b.fresh("normed"), "", "", self.b.fresh("residual")],
                         domain=MS_DOMAIN, epsilon=self.cfg.rms_norm_eps)
        return out[0], out[3]

    def prefix_rows(self, param: torch.Tensor | None, name: str, *, rotate: bool) -> str:
        """(b, N, P*Hkv*D): the prefix rows put in front of the first step's keys or values.

        `param` None: P=1 beside prefixed P, whose N rows are zeros (and masked)."""
        b, first = self.b, self.first_values
        if param is None:
            table = b.const(np.zeros((1, self.N, self.Hkv * self.D)), self.np_dtype)
        else:
            rows = param.detach().permute(2, 0, 1, 3).reshape(1, self.N, -1)  # (1, N, P*Hkv*D), head p*Hkv + h
            table = self.tensor(name, rows)
        rows = b.op("Expand", table, first["expand_rows"])
        if rotate and param is not None:
            rows = b.op("RotaryEmbedding", rows, first["prefix_pos"], self.cos, self.sin, domain=MS_DOMAIN,
                        num_heads=param.shape[0] * self.Hkv)
        return rows

    def attention(self, x: str, attn: torch.nn.Module, i: int, prefix: str) -> str:
        w = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
        bias = torch.cat((attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))
        qkv = self.linear(x, w, f"{prefix}.self_attn.qkv_proj", f"{prefix}.self_attn.q_proj", bias)
        presents = [contract.present_key(i), contract.present_value(i)]
        if self.multi:
            b = self.b
            out = self.switch(lambda p: self.attention_core(qkv, i, prefix, p, [b.fresh("present_k"),
                                                                                 b.fresh("present_v")]),
                              [b.fresh("attn"), *presents])[0]
        else:
            out = self.attention_core(qkv, i, prefix, self.P, presents)[0]
        return self.linear(out, attn.o_proj.weight, f"{prefix}.self_attn.o_proj", f"{prefix}.self_attn.o_proj")

    def attention_core(self, qkv: str, i: int, prefix: str, P: int, presents: list[str]) -> list[str]:  # noqa: N803
        """GroupQueryAttention over the P streams as heads: [(b, s*P, H*D), present key, present value].

        With a prefix, an `If` on the first step: its `then` branch puts the prefix rows in front of
        the keys and values (and zero rows in front of the queries); decode steps run the bare
        GroupQueryAttention of the `else` branch."""
        b, H, Hkv, D = self.b, self.H, self.Hkv, self.D
        if P == 1 and not self.N:  # the projection's output is already GroupQueryAttention's packed QKV layout
            return self.gqa(qkv, "", "", i, P, self.bias, presents)
        q, k, v = b.ops("Split", qkv, b.const([H * D, Hkv * D, Hkv * D]), outputs=3, axis=-1)
        if P > 1:
            q = b.op("Reshape", q, b.const([0, -1, P * H * D]))  # (b, s, P*H*D): head p*H + h
            k = b.op("Reshape", k, b.const([0, -1, P * Hkv * D]))  # (b, s, P*Hkv*D)
            v = b.op("Reshape", v, b.const([0, -1, P * Hkv * D]))
        if not self.N:
            out, key, value = self.gqa(q, k, v, i, P, self.bias, presents)
        else:
            bias = self.bias if P > 1 else self.bias_p1

            def fresh() -> list[str]:
                return [b.fresh("present_k"), b.fresh("present_v")]

            out, key, value = b.branch(self.first, lambda: self.first_attention(q, k, v, i, prefix, P, fresh()),
                                       lambda: self.gqa(q, k, v, i, P, bias, fresh()), [b.fresh("attn"), *presents])
        if P > 1:
            out = b.op("Reshape", out, b.const([0, -1, H * D]))  # (b, s*P, H*D)
        return [out, key, value]

    def first_attention(self, q: str, k: str, v: str, i: int, prefix: str, P: int,  # noqa: N803
                        presents: list[str]) -> list[str]:
        """The first step: the N prefix rows in front of keys and values, N zero rows in front of the
        queries (their outputs dropped)."""
        b, first = self.b, self.first_values
        attn = self.models[P].model.layers[i].self_attn
        tag = f".p{P}" if self.multi else ""  # each P's own prefix tensors
        pk, pv = (attn.prefix_k, attn.prefix_v) if P > 1 else (None, None)
        q = b.op("Concat", first[f"zero_queries_p{P}"], q, axis=1)
        k = b.op("Concat", self.prefix_rows(pk, f"{prefix}.self_attn.prefix_k{tag}", rotate=True), k, axis=1)
        v = b.op("Concat", self.prefix_rows(pv, f"{prefix}.self_attn.prefix_v{tag}", rotate=False), v, axis=1)
        bias = first["bias_first"] if P > 1 else first["bias_first_p1"]
        out, key, value = self.gqa(q, k, v, i, P, bias, presents)
        return [b.op("Slice", out, b.const([self.N]), b.const([_INT_MAX]), b.const([1])), key, value]

    def gqa(self, q: str, k: str, v: str, i: int, P: int, bias: str, presents: list[str]) -> list[str]:  # noqa: N803
        """One GroupQueryAttention node, the P streams as heads, rotary inside, writing the cache in place:
        [(b, s*P or s, heads*D), present key, present value]."""
        tag = f".p{P}" if self.multi else ""
        return self.b.ops(
            "GroupQueryAttention", q, k, v, contract.past_key(i), contract.past_value(i), self.seqlens, self.total,
            self.cos, self.sin, "", bias,  # no position_ids: rotation by cache index
            outputs=[self.b.fresh("attn"), *presents], domain=MS_DOMAIN, num_heads=P * self.H,
            kv_num_heads=P * self.Hkv, do_rotary=1, name=f"model.layers.{i}.self_attn.gqa{tag}",
        )

    def mlp(self, x: str, mlp: torch.nn.Module, prefix: str) -> str:
        b, inter = self.b, self.cfg.intermediate_size
        w = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight))
        gu = self.linear(x, w, f"{prefix}.mlp.gate_up_proj", f"{prefix}.mlp.gate_proj")
        gate, up = b.ops("Split", gu, b.const([inter, inter]), outputs=2, axis=-1)
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # SiLU(gate) * up
        return self.linear(act, mlp.down_proj.weight, f"{prefix}.mlp.down_proj", f"{prefix}.mlp.down_proj")

    def keep_last(self, x: str, keep: str) -> str:
        """The last `keep` positions of (b, s*P, h); keep == 0 keeps them all."""
        b = self.b
        if self.multi:
            shape = b.op("Concat", b.const([0, -1]), b.op("Mul", self.P_t, b.const([self.h])), axis=0)
        else:
            shape = b.const([0, -1, self.P * self.h])
        tokens = b.op("Reshape", x, shape)  # (b, s, P*h)
        start = b.op("Where", b.op("Greater", keep, b.const(0)), b.op("Neg", keep), b.const(0))
        tokens = b.op("Slice", tokens, b.op("Unsqueeze", start, b.const([0])), b.const([_INT_MAX]), b.const([1]))
        return b.op("Reshape", tokens, b.const([0, -1, self.h]))

    def aggregate(self, y: str, P: int) -> str:  # noqa: N803
        """Mix the P stream states (b, k*P, h) into (b, k, h): softmax weights in float32, smoothed."""
        b, h = self.b, self.h
        agg, smooth = self.models[P].model.aggregate_layer, self.cfg.parscale_attn_smooth
        name = f"model.aggregate_layer.p{P}." if self.multi else "model.aggregate_layer."
        # The checkpoint's first Linear reads features hidden-major (k*P + p); our (b, k, P*h) view is
        # stream-major (p*h + k): permute its input columns once instead of the activations every step.
        w1 = agg[0].weight.detach().reshape(h, h, P).permute(0, 2, 1).reshape(h, P * h)
        concat = b.op("Reshape", y, b.const([0, -1, P * h]))  # (b, k, P*h)
        z = self.linear(concat, w1, name + "0", None, agg[0].bias)
        z = b.op("Mul", z, b.op("Sigmoid", z))
        z = self.linear(z, agg[2].weight, name + "2", None, agg[2].bias)  # (b, k, P)
        streams = b.op("Reshape", y, b.const([0, -1, P, h]))  # (b, k, P, h)
        if self.dtype != torch.float32:
            z, streams = self.cast(z, TensorProto.FLOAT), self.cast(streams, TensorProto.FLOAT)
        w = b.op("Softmax", z, axis=-1)
        w = b.op("Add", b.op("Mul", w, b.const(1.0 - smooth, np.float32)), b.const(smooth / P, np.float32))
        mixed = b.op("MatMul", b.op("Unsqueeze", w, b.const([2])), streams)  # (b, k, 1, h)
        mixed = b.op("Reshape", mixed, b.const([0, -1, h]))
        if self.dtype != torch.float32:
            mixed = self.cast(mixed, ONNX_DTYPE[self.dtype])
        return mixed

    def lm_head(self, y: str) -> str:
        b = self.b
        if self.cfg.tie_word_embeddings:
            # MatMul(x, Transpose(table)): the table is stored once; quantization replaces the pair.
            table = b.op("Transpose", EMBED_WEIGHT, perm=[1, 0])
            out = b.op("MatMul", y, table, name=LM_HEAD)
            self.quant_meta[b.nodes[-1].name] = {QUANT_KEY: f"{EMBED_WEIGHT}|lm_head"}
            return out
        return self.linear(y, self.m.lm_head.weight, LM_HEAD, "lm_head")

