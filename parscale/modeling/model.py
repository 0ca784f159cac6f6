"""A compact PyTorch ParScale decoder (Qwen2 backbone, P streams): the reference every export is checked against.

Module attribute names match the checkpoint's tensor names, so `load_state_dict` needs no mapping.
The P streams are folded into the batch (row p*b + i) for every projection and MLP; in attention
and in the KV cache they are extra heads (head p*Hkv + h), which is the graph contract of
`parscale.contract`. Semantics: ../shared/PARSCALE_SPEC.md.

Shape letters: b batch, P streams, s new tokens, T cached tokens (past + s), N prefix entries,
H query heads, Hkv KV heads, g = H // Hkv, D head_dim, h hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parscale.config import ParScaleConfig

KVCache = list[tuple[Tensor, Tensor]]  # per layer: (key, value), each (b, P*Hkv, T, D)


# ----------------------------------------------------------------------------- pure functions


# A decoder layer's linear projections (module paths inside a layer), grouped by the tensor they
# read: projections that read one input share GPTQ's statistics. Keys name each group's first.
PROJECTION_INPUTS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
PROJECTIONS = tuple(p for group in PROJECTION_INPUTS.values() for p in group)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Qwen2 RoPE tables for the given positions, float32: two (b, s, D) tensors."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (D/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (b, s, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half rotation (Qwen2 / GPT-NeoX style) of x (b, heads, s, D) by (b, s, D) tables."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_bias(attention_mask: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    """Additive mask (b, 1, 1, s, T): 0 where key j is visible to new token i, else a large negative.

    Key j (cache index) is visible when it is a real token and j <= past + i. The bias is finite
    so that a query with no visible key (a padded row at P=1) stays finite instead of NaN.
    """
    total = attention_mask.shape[1]
    past = total - seq_len
    query_pos = torch.arange(seq_len, device=attention_mask.device)[:, None] + past  # (s, 1)
    causal = torch.arange(total, device=attention_mask.device)[None, :] <= query_pos  # (s, T)
    allowed = causal[None] & attention_mask[:, None, :].bool()  # (b, s, T)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None, None]  # (b, 1, 1, s, T)


def fold_streams(x: Tensor, P: int) -> Tensor:  # noqa: N803
    """(b, ...) -> (P*b, ...), stream-major: row p*b + i is stream p of sequence i."""
    return x.repeat(P, *([1] * (x.dim() - 1)))


def streams_to_heads(x: Tensor, P: int) -> Tensor:  # noqa: N803
    """(P*b, s, heads, D) -> (b, P*heads, s, D): the streams become extra heads."""
    Pb, s, heads, d = x.shape
    return x.reshape(P, Pb // P, s, heads, d).permute(1, 0, 3, 2, 4).reshape(Pb // P, P * heads, s, d)


def heads_to_streams(x: Tensor, P: int) -> Tensor:  # noqa: N803
    """(b, P*heads, s, D) -> (P*b, s, heads*D): inverse of `streams_to_heads`, heads flattened."""
    b, Ph, s, d = x.shape
    return x.reshape(b, P, Ph // P, s, d).permute(1, 0, 3, 2, 4).reshape(P * b, s, (Ph // P) * d)


def aggregate_streams(y: Tensor, P: int, layer: nn.Sequential, smooth: float) -> Tensor:  # noqa: N803
    """Mix the P stream states (P*b, s, h) into (b, s, h) with the learned, smoothed softmax weights."""
    Pb, s, h = y.shape
    streams = y.reshape(P, Pb // P, s, h)  # (P, b, s, h)
    concat = streams.permute(1, 2, 3, 0).reshape(Pb // P, s, h * P)  # feature k*P + p
    w = torch.softmax(layer(concat).float(), dim=-1)  # (b, s, P)
    w = w * (1.0 - smooth) + smooth / P
    return torch.einsum("bsp,pbsh->bsh", w, streams.float()).to(y.dtype)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ParScaleConfig) -> None:
        super().__init__()
        h, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.P, self.H, self.Hkv, self.D = cfg.P, H, Hkv, D
        self.q_proj = nn.Linear(h, H * D, bias=True)
        self.k_proj = nn.Linear(h, Hkv * D, bias=True)
        self.v_proj = nn.Linear(h, Hkv * D, bias=True)
        self.o_proj = nn.Linear(H * D, h, bias=False)
        if cfg.n_prefix:
            self.prefix_k = nn.Parameter(torch.zeros(cfg.P, Hkv, cfg.n_prefix, D))
            self.prefix_v = nn.Parameter(torch.zeros(cfg.P, Hkv, cfg.n_prefix, D))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        P, H, Hkv, D = self.P, self.H, self.Hkv, self.D
        g = H // Hkv
        Pb, s, _ = x.shape
        b = Pb // P
        q = streams_to_heads(self.q_proj(x).view(Pb, s, H, D), P)  # (b, P*H, s, D)
        k = streams_to_heads(self.k_proj(x).view(Pb, s, Hkv, D), P)  # (b, P*Hkv, s, D)
        v = streams_to_heads(self.v_proj(x).view(Pb, s, Hkv, D), P)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat((past[0], k), dim=2)  # (b, P*Hkv, T, D)
        v = torch.cat((past[1], v), dim=2)

        # GQA without repeating the cache: the g query heads of a KV head share its rows.
        qg = q.reshape(b, P * Hkv, g * s, D) * (D**-0.5)
        scores = (qg @ k.transpose(-1, -2)).view(b, P * Hkv, g, s, -1) + bias  # (b, P*Hkv, g, s, T)
        if hasattr(self, "prefix_k"):
            # Prefix entries: per stream, never masked, no RoPE, not in the cache.
            pk = self.prefix_k.reshape(1, P * Hkv, -1, D).to(q.dtype)  # (1, P*Hkv, N, D)
            pv = self.prefix_v.reshape(1, P * Hkv, -1, D).to(q.dtype)
            n = pk.shape[2]
            prefix_scores = (qg @ pk.transpose(-1, -2)).view(b, P * Hkv, g, s, n)
            scores = torch.cat((prefix_scores, scores), dim=-1)  # (b, P*Hkv, g, s, N+T)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if hasattr(self, "prefix_k"):
            out = probs[..., n:].reshape(b, P * Hkv, g * s, -1) @ v
            out = out + probs[..., :n].reshape(b, P * Hkv, g * s, n) @ pv
        else:
            out = probs.reshape(b, P * Hkv, g * s, -1) @ v  # (b, P*Hkv, g*s, D)
        out = heads_to_streams(out.reshape(b, P * H, s, D), P)  # (P*b, s, H*D)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ParScaleConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ParScaleConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, bias, past):  # type: ignore[no-untyped-def]
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, bias, past)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class ParScaleModel(nn.Module):
    def __init__(self, cfg: ParScaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.P > 1:
            h = cfg.hidden_size
            self.aggregate_layer = nn.Sequential(
                nn.Linear(h * cfg.P, h), nn.SiLU(), nn.Linear(h, cfg.P)
            )


class ParScaleForCausalLM(nn.Module):
    """ParScale decoder with an LM head. `forward` follows the graph contract (cache as extra heads)."""

    def __init__(self, cfg: ParScaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = ParScaleModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def empty_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """A zero-length cache for the first step: (b, P*Hkv, 0, D) per layer."""
        cfg = self.cfg
        dtype = dtype or self.lm_head.weight.dtype
        shape = (batch, cfg.cache_heads, 0, cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                for _ in range(cfg.num_hidden_layers)]

    def forward(
        self,
        input_ids: Tensor,  # (b, s)
        attention_mask: Tensor | None = None,  # (b, T), 1 = real token
        position_ids: Tensor | None = None,  # (b, s), counts real tokens
        past_key_values: KVCache | None = None,
        num_logits_to_keep: int = 0,  # 0: all positions, k: the last k
    ) -> tuple[Tensor, KVCache]:
        """Logits (b, s or k, vocab) in float32 and the updated cache (b, P*Hkv, T, D) per layer."""
        cfg, m = self.cfg, self.model
        b, s = input_ids.shape
        past_key_values = past_key_values or self.empty_cache(b)
        if attention_mask is None:
            attention_mask = torch.ones(b, past_key_values[0][0].shape[2] + s, dtype=torch.int64)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]

        x = fold_streams(m.embed_tokens(input_ids), cfg.P)  # (P*b, s, h)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # (b, s, D)
        bias = attention_bias(attention_mask, s, torch.float32)  # (b, 1, 1, s, T)
        presents: KVCache = []
        for layer, past in zip(m.layers, past_key_values, strict=True):
            x, present = layer(x, cos, sin, bias, past)
            presents.append(present)

        x = keep_last(x, num_logits_to_keep)  # (P*b, k, h)
        x = m.norm(x)
        if cfg.P > 1:
            x = aggregate_streams(x, cfg.P, m.aggregate_layer, cfg.parscale_attn_smooth)
        return self.lm_head(x).float(), presents


def keep_last(x: Tensor, k: int) -> Tensor:
    """The last k positions of (n, s, h); k == 0 keeps them all (`num_logits_to_keep`)."""
    return x if k == 0 else x[:, -k:]
