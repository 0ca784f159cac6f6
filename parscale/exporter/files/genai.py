"""genai_config.json (and per-P overlays): how onnxruntime-genai drives an export as a plain decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parscale import contract
from parscale.config import ParScaleConfig
from parscale.manifest import MODEL_FILE

# onnxruntime-genai allocates its shared KV buffer at search.max_length rows and zero-fills it: a
# default of the whole context (32768 for Qwen2.5) would commit gigabytes before the first token.
GENAI_MAX_LENGTH = 4096


GENAI_OVERLAY = "genai_overlay.p{}.json"  # a multi-P export: what genai_config.json changes for each P


def write_genai_configs(out: Path, cfg: ParScaleConfig, eos: list[int], Ps: list[int]) -> list[str]:  # noqa: N803
    """genai_config.json (for `cfg`'s P, the largest); for a multi-P export also one overlay per P.

    onnxruntime-genai drives the one graph at any of its P: the cache heads it allocates (P*Hkv) pick
    the P. An overlay holds the two fields that change, for `og.Config.overlay` (genai refuses config
    paths that leave the config's folder, so per-P folders could not share the graph). Returns the
    names written.
    """
    written = []
    for P in Ps if len(Ps) > 1 else []:
        decoder = genai_config(cfg.at(P), eos, context_length=1)["model"]["decoder"]
        fields = {k: decoder[k] for k in ("num_attention_heads", "num_key_value_heads")}
        (out / GENAI_OVERLAY.format(P)).write_text(json.dumps({"model": {"decoder": fields}}, indent=2) + "\n")
        written.append(GENAI_OVERLAY.format(P))
    config = genai_config(cfg, eos, context_length=cfg.max_position_embeddings)
    (out / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["genai_config.json", *written]


def genai_config(cfg: ParScaleConfig, eos: list[int], *, context_length: int) -> dict[str, Any]:
    """A genai_config.json with which onnxruntime-genai drives the export as a plain decoder.

    genai runs it in its shared-buffer mode (`past_present_share_buffer`: one max_length buffer bound
    as past and present, as for its own GroupQueryAttention builds). That buffer also holds the
    `parscale_n_tokens` prefix rows of each stream (contract.py): a genai generation can reach
    max_length - prefix tokens, so ask genai for max_length = the tokens you need + the prefix.
    """
    n = cfg.num_hidden_layers
    in_vocab = [e for e in eos if 0 <= e < cfg.vocab_size] or [cfg.vocab_size - 1]
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else in_vocab[0],
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": contract.INPUT_IDS,
                    "attention_mask": contract.ATTENTION_MASK,
                    "position_ids": contract.POSITION_IDS,
                    "past_key_names": contract.past_key(0).replace(".0.", ".%d."),
                    "past_value_names": contract.past_value(0).replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": contract.LOGITS,
                    "present_key_names": contract.present_key(0).replace(".0.", ".%d."),
                    "present_value_names": contract.present_value(0).replace(".0.", ".%d."),
                },
                "num_attention_heads": cfg.P * cfg.num_attention_heads,
                "num_hidden_layers": n,
                "num_key_value_heads": cfg.cache_heads,
            },
            "eos_token_id": in_vocab if len(in_vocab) > 1 else in_vocab[0],
            "pad_token_id": in_vocab[0],
            "type": "decoder",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
            "length_penalty": 1.0, "max_length": min(context_length, GENAI_MAX_LENGTH), "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
