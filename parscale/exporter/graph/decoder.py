"""The fused decoder graph, written node by node from the PyTorch module's weights.

Why written and not traced: the traced graph ran about 1,255 nodes per step (attention as
MatMul/Softmax chains, the cache grown by Concat). Here each layer is one packed QKV projection,
one `com.microsoft.GroupQueryAttention` (rotary inside, P streams as heads: num_heads = P*H,
kv_num_heads = P*Hkv), one packed gate/up projection, and (Skip)SimplifiedLayerNormalization:
about 16 nodes per layer at P=1 and 27 with the prefix (0.5B: 441 and 736 nodes). The PyTorch
module stays the reference the graph is validated against.

The graph reads as the module does: embed -> layer(i) x n -> norm -> streams -> head, and a layer is
four calls (norm, attention, norm, MLP). Hidden states are (b, s*P, h), the P streams interleaved
(`streams.py`); attention, with the prefix and the operator, is `attention.py`; what every layer
shares within a step is one frozen `StepValues` (`step_values.py`).

The prefix (ParScale's learned keys/values, `parscale_n_tokens` per stream and layer) lives in
the first N rows of the KV cache: on the first step (mask length == new tokens) N prefix rows are
put in front of the keys/values and N zero rows in front of the queries (their outputs are
dropped); the prefix is never masked. Cache rows = N + tokens: a runtime sizes a shared buffer by
that.

Several P over one backbone (head sets, `parscale.modeling.heads`) make one graph: the backbone's
nodes (and their weights) appear once, and P is read from the cache's heads (P*Hkv). Only the
P-specific parts (each layer's GroupQueryAttention, whose head counts are attributes, with its
prefix rows; the aggregation) sit in nested `If` branches, one per P. A runtime picks P by the
cache it binds; P=1 there keeps N masked rows in front so that all P share one cache layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from parscale import contract
from parscale.errors import ParScaleError
from parscale.exporter.graph.attention import Attention
from parscale.exporter.graph.builder import EMBED_WEIGHT, MS_DOMAIN, GraphBuilder
from parscale.exporter.graph.step_values import StepValues
from parscale.exporter.graph.streams import ParallelStreams
from parscale.exporter.graph.weights import WeightWriter
from parscale.modeling.model import ParScaleForCausalLM

LM_HEAD = "lm_head"
_INT_MAX = np.iinfo(np.int64).max


def check_supported(head_dim: int) -> None:
    """GroupQueryAttention's CPU kernel rotates heads whose size is a multiple of 16 only."""
    if head_dim % 16:
        raise ParScaleError(f"head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's "
                            "GroupQueryAttention needs; every published Qwen2 / ParScale shape has 64 or 128")


def build_decoder(
    models: dict[int, ParScaleForCausalLM], folder: Path, *, dtype: torch.dtype, opset: int,
    external_threshold: int, metadata: dict[str, str] | None = None, attention: type[Attention] = Attention,
) -> int:
    """Write the fused graph of `models` (P -> module) to `folder/model.onnx` (+ data); returns its weight bytes.

    Several P share one backbone: one graph then serves every P.
    Weights are converted to `dtype` one tensor at a time. MatMuls that quantization may replace
    carry `QUANT_KEY` metadata naming the weight and the calibration statistics it reads.
    `attention`: the class that writes each layer's attention (`attention.py`).
    """
    check_supported(next(iter(models.values())).cfg.head_dim)
    decoder = Decoder(models, GraphBuilder(folder), dtype, attention)
    decoder.build()
    decoder.b.save(opset, external_threshold=external_threshold, metadata=metadata,
                   node_metadata=decoder.w.quant_meta)
    return decoder.b.external_bytes


class Decoder:
    """The graph of `models` (P -> module over one backbone), written node by node into `builder`."""

    def __init__(self, models: dict[int, ParScaleForCausalLM], builder: GraphBuilder, dtype: torch.dtype,
                 attention: type[Attention] = Attention) -> None:
        self.m = models[max(models)]  # the backbone, shared by all
        self.cfg, self.b = self.m.cfg, builder
        self.w = WeightWriter(builder, dtype)
        self.streams = ParallelStreams(self.w, models)
        self.attention = attention(self.w, models, self.streams.per_P, self.streams.rows)

    def build(self) -> None:
        """embed -> layer(i) x n -> norm -> streams -> head."""
        ids, mask, keep = self.inputs()
        sv = self.attention.step_values(ids, mask, self.streams.read_count())
        x = self.embed(ids)  # (b, s*P, h)
        delta, residual = None, x
        for i in range(self.cfg.num_hidden_layers):
            delta, residual = self.layer(i, delta, residual, sv)
        y, _ = self.norm(delta, residual, self.m.model.norm.weight, "model.norm.weight")
        y = self.streams.keep_last(y, keep)  # (b, k*P, h)
        self.head(self.streams.mix(y))  # (b, k, h): one LM head over the kept positions only

    def layer(self, i: int, delta: str | None, residual: str, sv: StepValues) -> tuple[str, str]:
        """Decoder layer i: (its MLP output, still to be added, and the residual stream).

        `delta`: the previous layer's MLP output, added to `residual` inside this layer's first norm
        (None for the first layer, whose residual is the embedding)."""
        layer, prefix = self.m.model.layers[i], f"model.layers.{i}"
        normed, residual = self.norm(delta, residual, layer.input_layernorm.weight, f"{prefix}.input_layernorm.weight")
        attn = self.attention(i, normed, sv)
        normed, residual = self.norm(attn, residual, layer.post_attention_layernorm.weight,
                                     f"{prefix}.post_attention_layernorm.weight")
        return self.mlp(i, normed), residual

    # ------------------------------------------------------------------ the parts

    def inputs(self) -> tuple[str, str, str]:
        """The contract's inputs and outputs; returns (input_ids, attention_mask, num_logits_to_keep)."""
        b, cfg, n = self.b, self.cfg, self.cfg.num_hidden_layers
        fdt = self.w.onnx_dtype
        ids = b.input(contract.INPUT_IDS, TensorProto.INT64, [contract.BATCH, contract.SEQ])
        mask = b.input(contract.ATTENTION_MASK, TensorProto.INT64, [contract.BATCH, contract.TOTAL])
        b.input(contract.POSITION_IDS, TensorProto.INT64, [contract.BATCH, contract.SEQ])
        heads: int | str = contract.CACHE_HEADS if self.streams.multi else cfg.cache_heads
        for name in contract.past_names(n):
            b.input(name, fdt, [contract.BATCH, heads, contract.PAST, cfg.head_dim])
        keep = contract.NUM_LOGITS_TO_KEEP
        b.inputs.append(helper.make_tensor_value_info(keep, TensorProto.INT64, []))
        b.initializers.append(numpy_helper.from_array(np.array(1, np.int64), keep))  # optional: 1 = the last
        axes = contract.axes(n)
        b.outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [*axes[name][:2], cfg.vocab_size])
                      for name in (contract.LOGITS, contract.KEPT_LOGITS)]
        for name in contract.present_names(n):
            b.output(name, fdt, [contract.BATCH, heads, contract.TOTAL, cfg.head_dim])
        return ids, mask, keep

    def embed(self, ids: str) -> str:
        """(b, s) token ids -> (b, s*P, h): the embedding rows, one copy per stream."""
        b = self.b
        x = b.op("Gather", self.w.tensor(EMBED_WEIGHT, self.m.model.embed_tokens.weight), ids, name="embed_tokens")
        self.w.mark(EMBED_WEIGHT, "")
        return self.streams.fan_out(x)

    def norm(self, delta: str | None, residual: str, weight: torch.Tensor, name: str) -> tuple[str, str]:
        """(normed, residual + delta), the add fused into one SkipSimplifiedLayerNormalization; `delta`
        None: the residual normed alone."""
        b, eps = self.b, self.cfg.rms_norm_eps
        if delta is None:
            return b.op("SimplifiedLayerNormalization", residual, self.w.tensor(name, weight), axis=-1, epsilon=eps,
                        stash_type=1), residual
        out = b.ops("SkipSimplifiedLayerNormalization", delta, residual, self.w.tensor(name, weight),
                    outputs=[b.fresh("normed"), "", "", b.fresh("residual")], domain=MS_DOMAIN, epsilon=eps)
        return out[0], out[3]

    def mlp(self, i: int, x: str) -> str:
        """Layer i's SwiGLU MLP: packed gate/up projection, SiLU(gate) * up, down projection."""
        b, inter, prefix = self.b, self.cfg.intermediate_size, f"model.layers.{i}"
        mlp = self.m.model.layers[i].mlp
        w = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight))
        gu = self.w.linear(x, w, f"{prefix}.mlp.gate_up_proj", f"{prefix}.mlp.gate_proj")
        gate, up = b.ops("Split", gu, b.const([inter, inter]), outputs=2, axis=-1)
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)  # SiLU(gate) * up
        return self.w.linear(act, mlp.down_proj.weight, f"{prefix}.mlp.down_proj", f"{prefix}.mlp.down_proj")

    def head(self, y: str) -> None:
        """The LM head over (b, k, h): `kept_logits` (b, k, vocab) in float32, and `logits`, the last one."""
        b = self.b
        if self.cfg.tie_word_embeddings:
            # MatMul(x, Transpose(table)): the table is stored once; quantization replaces the pair.
            table = b.op("Transpose", EMBED_WEIGHT, perm=[1, 0])
            kept = b.op("MatMul", y, table, name=LM_HEAD)
            self.w.mark(EMBED_WEIGHT, "lm_head")
        else:
            kept = self.w.linear(y, self.m.lm_head.weight, LM_HEAD, "lm_head")
        if self.w.dtype != torch.float32:
            kept = self.w.cast(kept, TensorProto.FLOAT)
        b.nodes[-1].output[0] = kept = contract.KEPT_LOGITS
        b.op("Slice", kept, b.const([-1]), b.const([_INT_MAX]), b.const([1]), outputs=[contract.LOGITS])
