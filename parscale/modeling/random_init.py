"""Random checkpoints in the published layout (`parscale init`): preset backbones, random weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from parscale.args import check_int, check_seed
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.modeling.checkpoint import DTYPES, checkpoint_folder, save_checkpoint
from parscale.modeling.model import ParScaleForCausalLM

# Backbone shapes of real models (their published config.json); P and prefix come from the caller.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "qwen2.5-3b": dict(  # the backbone of ParScale-Qwen-3B / ParScale-QwenInit-3B
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
}

# More shards than this is a typo, not a layout anyone publishes (each shard is a file).
MAX_SHARDS = 1000
MAX_P, MAX_PREFIX = 64, 4096  # the paper goes to P=8 and 48 prefix tokens

def make_config(
    preset: str = "tiny", *, P: int = 1, prefix: int = 48, tied: bool | None = None,  # noqa: N803
    dtype: str = "bfloat16", **overrides: Any,
) -> dict[str, Any]:
    """A `config.json` dict in the published ParScale layout for a preset backbone."""
    if preset not in PRESETS:
        raise ParScaleError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if P < 1:
        raise ParScaleError(f"P must be >= 1, got {P}")
    if dtype not in DTYPES:
        raise ParScaleError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    d: dict[str, Any] = {
        "architectures": ["Qwen2ParScaleForCausalLM"],
        "model_type": "qwen2_parscale",
        **PRESETS[preset],
        "hidden_act": "silu",
        "use_sliding_window": False,
        "rope_scaling": None,
        "parscale_n": P,
        "parscale_n_tokens": prefix,
        "parscale_attn_smooth": 0.01,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if tied is not None:
        d["tie_word_embeddings"] = tied
    d.update(overrides)
    return d


def random_model(cfg: ParScaleConfig, seed: int) -> ParScaleForCausalLM:
    """A randomly initialised module (std 0.02 weights, unit norms, small prefixes)."""
    gen = torch.Generator().manual_seed(seed)
    model = ParScaleForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def init_checkpoint(
    out: str | Path, *, P: int, preset: str = "tiny", prefix: int = 48, seed: int = 0,  # noqa: N803
    dtype: str = "bfloat16", tied: bool | None = None, shards: int = 1, force: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Create a random checkpoint folder at `out` (atomically; an existing folder needs `force`).

    `overrides`: config.json keys that replace the preset's (a custom shape, e.g. another width).
    """
    out = Path(out)
    check_int(shards, "shards", minimum=1, maximum=MAX_SHARDS)
    # Random weights for demos and tests: bounds keep a typo from allocating gigabytes.
    check_int(P, "P", minimum=1, maximum=MAX_P)
    check_int(prefix, "prefix", minimum=1, maximum=MAX_PREFIX)
    check_seed(seed)
    config = make_config(preset, P=P, prefix=prefix, tied=tied, dtype=dtype, **(overrides or {}))
    cfg = ParScaleConfig.from_dict(config)
    checkpoint_folder(out, force).check()  # refuse before building the model
    model = random_model(cfg, seed)
    with checkpoint_folder(out, force) as tmp:
        save_checkpoint(model, config, tmp, shards=shards)
    return out


def init_heads(folder: str | Path, Ps: Sequence[int], *, seed: int = 0, std: float = 0.02) -> list[Path]:  # noqa: N803
    """Random head sets for `Ps` beside a checkpoint (prefixes and aggregation drawn with `std`, in the
    checkpoint's dtype): a multi-P folder for demos, tests and benchmarks (`parscale.modeling.heads`)."""
    from parscale.modeling.heads import is_head_tensor, write_heads

    folder = Path(folder)
    cfg = ParScaleConfig.load(folder)
    dtype = DTYPES.get(cfg.torch_dtype, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    written = []
    for P in Ps:
        check_int(P, "P", minimum=2, maximum=MAX_P)
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in ParScaleForCausalLM(cfg.at(P)).named_parameters()
                      if is_head_tensor(n)}
        tensors = {n: torch.randn(shape, generator=gen).mul_(std).to(dtype) for n, shape in shapes.items()}
        written.append(write_heads(folder, P, tensors))
    return written
