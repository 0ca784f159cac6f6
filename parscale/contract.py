"""The graph contract: names, dtypes and axes of an export's inputs and outputs.

Declared once here; the exporter builds graphs to it and the runtime drives graphs by it.
The P streams appear to the outside as P * num_key_value_heads KV heads (head p*Hkv + h),
so any decoder runtime can drive a ParScale export like a plain decoder.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"  # int64 [batch, seq]
ATTENTION_MASK = "attention_mask"  # int64 [batch, past+seq]; 1 = real token, 0 = padding
POSITION_IDS = "position_ids"  # int64 [batch, seq]; counts real tokens only
# int64 scalar, optional (an initializer supplies the default, 1): the positions whose logits come back in
# KEPT_LOGITS, the last k (0 = every position). Generation needs 1; a scorer asks for 0.
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"
# float32 [batch, 1, vocab]: the last position's logits, all a generating runtime reads. Its static 1 is
# what onnxruntime-genai looks for to skip the LM head on every prompt position but the last.
LOGITS = "logits"
KEPT_LOGITS = "kept_logits"  # float32 [batch, k, vocab]: the last num_logits_to_keep positions (0: all)

# The batch axis has the name optimum gives it: transformers.js sizes the empty first-step cache from
# the graph's input shapes and knows only "batch_size" (any other symbolic axis becomes 0).
BATCH, SEQ, PAST, TOTAL, KEPT = "batch_size", "seq", "past", "total", "kept"
# A graph serving several P (one backbone, head sets) has a symbolic cache-heads axis: P * Hkv, with
# P chosen by the runtime through the cache it binds (cache_info's "streams" lists the P it serves).
CACHE_HEADS = "kv_heads"


# The cache (format 2): one buffer per layer and kind, (batch, P*Hkv, rows, head_dim), that a runtime may
# bind as both past and present (GroupQueryAttention then writes the new rows in place). Its first
# `prefix_rows` rows hold ParScale's prefix keys/values, which the graph writes on the first step (the
# step whose attention_mask is as long as its input_ids); token rows follow. A buffer therefore needs
# prefix_rows + tokens rows. Recorded in the graph's metadata and the manifest as io["cache"].
CACHE_INFO = "cache"


def cache_info(prefix_rows: int, streams: list[int] | None = None, kv_heads: int | None = None) -> dict[str, object]:
    """io["cache"]: the prefix rows; for a graph serving several P, those P and the KV heads per stream."""
    info: dict[str, object] = {"prefix_rows": prefix_rows, "shared_buffer": True}
    if streams is not None:
        info |= {"streams": streams, "kv_heads_per_stream": kv_heads}
    return info


PAST_PREFIX = "past_key_values."  # cache inputs: past_key_values.{layer}.key / .value
PRESENT_PREFIX = "present."  # cache outputs: present.{layer}.key / .value


def past_key(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.key"


def past_value(layer: int) -> str:
    return f"{PAST_PREFIX}{layer}.value"


def present_key(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.key"


def present_value(layer: int) -> str:
    return f"{PRESENT_PREFIX}{layer}.value"


def past_names(num_layers: int) -> list[str]:
    """Cache inputs in graph order: key then value for each layer."""
    return [n for i in range(num_layers) for n in (past_key(i), past_value(i))]


def present_names(num_layers: int) -> list[str]:
    """Cache outputs in graph order, pairing with `past_names`."""
    return [n for i in range(num_layers) for n in (present_key(i), present_value(i))]


def input_names(num_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers), NUM_LOGITS_TO_KEEP]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, KEPT_LOGITS, *present_names(num_layers)]


def axes(num_layers: int, cache_heads: str | None = None) -> dict[str, list[str | int]]:
    """Symbolic axes of every input and output (a cache is [batch, P*Hkv, length, head_dim]).

    `cache_heads`: the name of the cache-heads axis where it is symbolic (a graph serving several P)."""
    a: dict[str, list[str | int]] = {
        INPUT_IDS: [BATCH, SEQ],
        ATTENTION_MASK: [BATCH, TOTAL],
        POSITION_IDS: [BATCH, SEQ],
        NUM_LOGITS_TO_KEEP: [],
        LOGITS: [BATCH, 1, "vocab"],
        KEPT_LOGITS: [BATCH, KEPT, "vocab"],
    }
    for n in past_names(num_layers):
        a[n] = [BATCH, cache_heads or "kv_heads", PAST, "head_dim"]
    for n in present_names(num_layers):
        a[n] = [BATCH, cache_heads or "kv_heads", TOTAL, "head_dim"]
    return a
