"""The files of an export folder beside `model.onnx`: copied sources and genai_config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from parscale import contract
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.manifest import MODEL_FILE
from parscale.modeling.heads import with_streams

# Copied from the checkpoint when present: configs and every tokenizer file format we know.
SOURCE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
)


def copy_source_files(model_dir: Path, out: Path, *, parscale_n: int | None = None) -> list[str]:
    """Copy configs and tokenizer files; returns the names copied.

    `parscale_n`: the P the export's config.json states, when it is not the checkpoint's own (an export
    of a head set, or of several P, whose config.json states the largest)."""
    copied = []
    for name in SOURCE_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
            copied.append(name)
    config = out / "config.json"
    if parscale_n is not None and config.is_file():
        data = json.loads(config.read_text())
        if data.get("parscale_n", 1) != parscale_n:
            data["parscale_n"] = parscale_n
            config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def check_sources(dirs: list[Path], cfg: ParScaleConfig) -> None:
    """Refuse, before any work, source files the export would copy but a runtime could not use.

    The tokenizer must fit the vocabulary (`parscale.text.check_tokenizer_fits`). Several checkpoint
    folders exported together share one copy of each file of SOURCE_FILES (but config.json, which
    states each P): those files must be in every folder alike, or in none, else the first folder's
    would silently win (another EOS id, another tokenizer) for the others' P.
    """
    from parscale.text import TOKENIZER_FILE, Tokenizer, check_tokenizer_fits

    if (dirs[0] / TOKENIZER_FILE).is_file():
        check_tokenizer_fits(Tokenizer(dirs[0] / TOKENIZER_FILE), cfg.vocab_size, dirs[0])
    for other in dirs[1:]:
        for name in SOURCE_FILES[1:]:
            a, b = _source(dirs[0] / name), _source(other / name)
            if a != b:
                how = ("is only in " + str(dirs[0] if b is None else other)) if None in (a, b) else "differs"
                raise ParScaleError(
                    f"{dirs[0]} and {other} are exported together but their {name} {how}: the export holds "
                    f"one {name} for every P; make the folders' {name} the same (copy one over the other)")


def _source(path: Path) -> Any:
    """A source file's content for comparison: JSON parsed (formatting aside), other files as bytes."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data
    return data


def eos_ids(model_dir: Path, cfg: ParScaleConfig) -> list[int]:
    """EOS ids from generation_config.json (preferred, as transformers does) or config.json."""
    path = model_dir / "generation_config.json"
    ids: Any = None
    where = path
    if path.is_file():
        try:
            ids = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ParScaleError(f"{path} is not a valid JSON object") from None
    if ids is None:
        ids, where = cfg.eos_token_id, model_dir / "config.json"
    if ids is None:
        return []
    ids = [ids] if not isinstance(ids, list) else ids
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ParScaleError(f"{where}: eos_token_id must be a token id or a list of them, got {ids!r}")
    return ids


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
        decoder = genai_config(with_streams(cfg, P), eos, context_length=1)["model"]["decoder"]
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
