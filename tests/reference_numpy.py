"""An independent, deliberately plain numpy reference of the ParScale forward pass (test oracle).

Written from ../shared/PARSCALE_SPEC.md only: it shares no code with `parscale.modeling.model` and
uses none of its tricks (no stream folding into the batch, no streams-as-heads, no cache). Everything
is float64, with explicit loops over streams, batch rows, heads and query positions, so that each
step can be read against the spec. It is slow on purpose; use it on tiny configs.

Public functions:
- `load_checkpoint(dir)` -> (config dict, weights dict), reading config.json and safetensors
  (single file or shards) with a small safetensors parser of its own (bf16/fp16/fp32/fp64).
- `reference_logits(weights, config, input_ids, attention_mask)` -> (b, s, vocab) float64.
- `reference_greedy(weights, config, input_ids, attention_mask, n_new)` -> (b, s + n_new) int64.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- checkpoint reading

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as float64 numpy arrays.

    Format: an 8-byte little-endian header length, a JSON header mapping names to
    {dtype, shape, data_offsets}, then the raw little-endian data.
    """
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    data = raw[8 + header_len:]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = data[start:end]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype == "BF16":
            # bfloat16 is the upper half of a float32: shift the 16 bits into place.
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view("<f4")
        elif dtype in _SAFETENSORS_DTYPES:
            arr = np.frombuffer(buf, dtype=np.dtype(_SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        out[name] = arr.astype(np.float64).reshape(shape)
    return out


def load_weights(model_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder: `model.safetensors`, or the shards named by the index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        weights: dict[str, np.ndarray] = {}
        for fname in sorted(set(weight_map.values())):
            for name, arr in read_safetensors(model_dir / fname).items():
                if weight_map.get(name) == fname:
                    weights[name] = arr
        missing = set(weight_map) - set(weights)
        if missing:
            raise ValueError(f"index lists tensors not found in their shard: {sorted(missing)[:3]}")
        return weights
    return read_safetensors(model_dir / "model.safetensors")


def load_checkpoint(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, weights as float64 arrays) of a checkpoint folder."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    return config, load_weights(model_dir)


# ----------------------------------------------------------------------------- config


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The constants the forward pass needs, with the spec's defaults."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    is_parscale = config.get("model_type") == "qwen2_parscale"
    P = int(config.get("parscale_n", 1)) if is_parscale else 1
    return {
        "P": P,
        "n_prefix": int(config.get("parscale_n_tokens", 48)) if P > 1 else 0,
        "smooth": float(config.get("parscale_attn_smooth", 0.01)),
        "layers": config["num_hidden_layers"],
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "theta": float(config.get("rope_theta", 10000.0)),
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


# ----------------------------------------------------------------------------- building blocks


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """torch.nn.Linear: y = x W^T + b, with W of shape (out, in)."""
    y = x @ weight.T
    return y if bias is None else y + bias


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(vec: np.ndarray, position: int, theta: float) -> np.ndarray:
    """Qwen2 RoPE of one head vector (D,) at one position: rotate the two halves.

    Pair (d, d + D/2) is rotated by the angle position * theta^(-2d/D).
    """
    D = vec.shape[0]
    half = D // 2
    out = np.empty_like(vec)
    for d in range(half):
        angle = position * theta ** (-(2.0 * d) / D)
        c, s = np.cos(angle), np.sin(angle)
        x1, x2 = vec[d], vec[d + half]
        out[d] = x1 * c - x2 * s
        out[d + half] = x2 * c + x1 * s
    return out


def real_token_positions(mask_row: np.ndarray) -> list[int]:
    """Position of each token = number of real (mask 1) tokens before it."""
    positions, seen = [], 0
    for m in mask_row:
        positions.append(seen)
        seen += int(m)
    return positions


# ----------------------------------------------------------------------------- one stream


def _attention(
    w: dict[str, np.ndarray], hp: dict[str, Any], layer: int, stream: int,
    x: np.ndarray, mask_row: np.ndarray, positions: list[int],
) -> np.ndarray:
    """Self-attention of one stream of one sequence: x (s, h) -> (s, h)."""
    pre = f"model.layers.{layer}.self_attn."
    H, Hkv, D = hp["heads"], hp["kv_heads"], hp["head_dim"]
    group = H // Hkv  # query head hq reads KV head hq // group
    s = x.shape[0]

    q = linear(x, w[pre + "q_proj.weight"], w[pre + "q_proj.bias"]).reshape(s, H, D)
    k = linear(x, w[pre + "k_proj.weight"], w[pre + "k_proj.bias"]).reshape(s, Hkv, D)
    v = linear(x, w[pre + "v_proj.weight"], w[pre + "v_proj.bias"]).reshape(s, Hkv, D)

    # RoPE on the real tokens' queries and keys, at their real-token positions.
    for t in range(s):
        for hq in range(H):
            q[t, hq] = rope(q[t, hq], positions[t], hp["theta"])
        for hk in range(Hkv):
            k[t, hk] = rope(k[t, hk], positions[t], hp["theta"])

    # This stream's prefix entries: as stored, no RoPE, never masked.
    has_prefix = hp["n_prefix"] > 0 and (pre + "prefix_k") in w
    prefix_k = w[pre + "prefix_k"][stream] if has_prefix else None  # (Hkv, N, D)
    prefix_v = w[pre + "prefix_v"][stream] if has_prefix else None

    out = np.zeros((s, H, D))
    for hq in range(H):
        hk = hq // group
        for t in range(s):
            keys, values = [], []
            if has_prefix:
                for n in range(prefix_k.shape[1]):
                    keys.append(prefix_k[hk, n])
                    values.append(prefix_v[hk, n])
            for j in range(t + 1):  # causal
                if mask_row[j] == 1:  # padding is never attended to
                    keys.append(k[j, hk])
                    values.append(v[j, hk])
            if not keys:
                continue  # a padded query with nothing visible (P=1): its output is never compared
            scores = np.array([q[t, hq] @ key for key in keys]) / np.sqrt(D)
            probs = softmax(scores)
            for p_j, value in zip(probs, values, strict=True):
                out[t, hq] += p_j * value
    return linear(out.reshape(s, H * D), w[pre + "o_proj.weight"])


def _mlp(w: dict[str, np.ndarray], layer: int, x: np.ndarray) -> np.ndarray:
    pre = f"model.layers.{layer}.mlp."
    gate = linear(x, w[pre + "gate_proj.weight"])
    up = linear(x, w[pre + "up_proj.weight"])
    return linear(silu(gate) * up, w[pre + "down_proj.weight"])


def _stream_hidden(
    w: dict[str, np.ndarray], hp: dict[str, Any], stream: int, ids_row: np.ndarray, mask_row: np.ndarray
) -> np.ndarray:
    """The decoder run for one stream of one sequence, final RMSNorm included: (s, h)."""
    positions = real_token_positions(mask_row)
    x = w["model.embed_tokens.weight"][ids_row]  # (s, h)
    for layer in range(hp["layers"]):
        pre = f"model.layers.{layer}."
        normed = rms_norm(x, w[pre + "input_layernorm.weight"], hp["eps"])
        x = x + _attention(w, hp, layer, stream, normed, mask_row, positions)
        normed = rms_norm(x, w[pre + "post_attention_layernorm.weight"], hp["eps"])
        x = x + _mlp(w, layer, normed)
    return rms_norm(x, w["model.norm.weight"], hp["eps"])


# ----------------------------------------------------------------------------- public API


def reference_hidden(
    weights: dict[str, np.ndarray], config: dict[str, Any],
    input_ids: np.ndarray, attention_mask: np.ndarray,
) -> np.ndarray:
    """Aggregated final hidden states (b, s, h), before the LM head."""
    hp = _hparams(config)
    P = hp["P"]
    input_ids = np.asarray(input_ids, dtype=np.int64)
    attention_mask = np.asarray(attention_mask, dtype=np.int64)
    b, s = input_ids.shape
    h = weights["model.embed_tokens.weight"].shape[1]

    # y[p, i]: stream p of sequence i, every stream reads the same tokens.
    y = np.zeros((P, b, s, h))
    for p in range(P):
        for i in range(b):
            y[p, i] = _stream_hidden(weights, hp, p, input_ids[i], attention_mask[i])
    if P == 1:
        return y[0]

    w0, b0 = weights["model.aggregate_layer.0.weight"], weights["model.aggregate_layer.0.bias"]
    w2, b2 = weights["model.aggregate_layer.2.weight"], weights["model.aggregate_layer.2.bias"]
    smooth = hp["smooth"]
    out = np.zeros((b, s, h))
    for i in range(b):
        for t in range(s):
            # Hidden-major, stream-minor: feature k*P + p holds y[p, i, t, k].
            concat = np.zeros(h * P)
            for k in range(h):
                for p in range(P):
                    concat[k * P + p] = y[p, i, t, k]
            mix = softmax(linear(silu(linear(concat, w0, b0)), w2, b2))  # (P,)
            mix = mix * (1.0 - smooth) + smooth / P
            for p in range(P):
                out[i, t] += mix[p] * y[p, i, t]
    return out


def reference_logits(
    weights: dict[str, np.ndarray], config: dict[str, Any],
    input_ids: np.ndarray, attention_mask: np.ndarray,
) -> np.ndarray:
    """Full-sequence logits (b, s, vocab), float64, of a (left-padded) batch; no cache.

    Rows of padded positions are computed but carry no meaning: compare where attention_mask == 1.
    """
    hp = _hparams(config)
    hidden = reference_hidden(weights, config, input_ids, attention_mask)
    head = weights["model.embed_tokens.weight"] if hp["tied"] else weights["lm_head.weight"]
    return linear(hidden, head)


def reference_greedy(
    weights: dict[str, np.ndarray], config: dict[str, Any],
    input_ids: np.ndarray, attention_mask: np.ndarray, n_new: int,
) -> np.ndarray:
    """Greedy generation of n_new tokens by re-running the full forward on the growing sequence.

    Returns the prompt followed by the new tokens: (b, s + n_new) int64.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    for _ in range(n_new):
        logits = reference_logits(weights, config, ids, mask)
        nxt = np.argmax(logits[:, -1], axis=-1).astype(np.int64)  # (b,)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
    return ids
