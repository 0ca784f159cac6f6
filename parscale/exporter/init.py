"""Write random checkpoints in the published layout (`parscale init`), and save trained ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from parscale.args import check_int, check_seed
from parscale.atomic import AtomicFolder, foreign_in_checkpoint
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.exporter.model import ParScaleForCausalLM

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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_config(
    preset: str = "tiny", *, P: int = 1, prefix: int = 48, tied: bool | None = None,  # noqa: N803
    dtype: str = "bfloat16", **overrides: Any,
) -> dict[str, Any]:
    """A `config.json` dict in the published ParScale layout for a preset backbone."""
    if preset not in PRESETS:
        raise ParScaleError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if P < 1:
        raise ParScaleError(f"--P must be >= 1, got {P}")
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


def save_checkpoint(
    model: ParScaleForCausalLM, config: dict[str, Any], out: Path, *, shards: int = 1,
    extra_files: dict[str, Path] | None = None,
) -> None:
    """Write config.json, generation_config.json and safetensors (optionally sharded) into `out`."""
    dtype = DTYPES[config.get("torch_dtype", "float32")]
    state = {n: t.detach().to(dtype).contiguous() for n, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    names = list(state)
    if shards <= 1:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[k * per:(k + 1) * per]}
            save_file(part, out / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, out / name)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes private files; a checkpoint is ordinary data


def init_checkpoint(
    out: str | Path, *, P: int, preset: str = "tiny", prefix: int = 48, seed: int = 0,  # noqa: N803
    dtype: str = "bfloat16", tied: bool | None = None, shards: int = 1, force: bool = False,
) -> Path:
    """Create a random checkpoint folder at `out` (atomically; an existing folder needs `force`)."""
    out = Path(out)
    check_int(shards, "--shards", minimum=1, maximum=MAX_SHARDS)
    # Random weights for demos and tests: bounds keep a typo from allocating gigabytes.
    check_int(P, "--P", minimum=1, maximum=MAX_P)
    check_int(prefix, "--prefix", minimum=1, maximum=MAX_PREFIX)
    check_seed(seed)
    config = make_config(preset, P=P, prefix=prefix, tied=tied, dtype=dtype)
    cfg = ParScaleConfig.from_dict(config)
    checkpoint_folder(out, force).check()  # refuse before building the model
    model = random_model(cfg, seed)
    with checkpoint_folder(out, force) as tmp:
        save_checkpoint(model, config, tmp, shards=shards)
    return out


def checkpoint_folder(out: Path, force: bool) -> AtomicFolder:
    """The atomic writer for checkpoint folders: `--force` replaces only an earlier checkpoint."""
    return AtomicFolder(out, force=force, is_replaceable=foreign_in_checkpoint, what="a parscale checkpoint")
