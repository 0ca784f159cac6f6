"""Model configuration: the subset of a Qwen2 / ParScale `config.json` that the graph depends on.

Torch-free, so that both the exporter and the runtime can read a checkpoint's configuration.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parscale.errors import ParScaleError

SUPPORTED_MODEL_TYPES = ("qwen2_parscale", "qwen2")


@dataclass(frozen=True)
class ParScaleConfig:
    """Shapes and constants of a ParScale (or plain Qwen2, P=1) decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    model_type: str = "qwen2_parscale"
    parscale_n: int = 1
    parscale_n_tokens: int = 48
    parscale_attn_smooth: float = 0.01
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParScaleConfig:
        """Build from a `config.json` dict: unknown keys are ignored, unsupported features refused."""
        if not isinstance(d, dict):
            raise ParScaleError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ParScaleError(
                f"unsupported model_type {model_type!r}: parscale exports "
                f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        if d.get("use_sliding_window"):
            raise ParScaleError("use_sliding_window=true is not supported (sliding-window attention)")
        # transformers >= 5 writes RoPE settings as `rope_parameters` instead of top-level keys.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ParScaleError(f"config.json: rope settings must be an object, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ParScaleError(f"rope_scaling type {kind!r} is not supported (only plain RoPE)")
        if "rope_theta" not in d and "rope_theta" in rope:
            d = {**d, "rope_theta": rope["rope_theta"]}
        if d.get("hidden_act", "silu") != "silu":
            raise ParScaleError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if model_type == "qwen2":
            kwargs["parscale_n"] = 1  # a plain Qwen2 checkpoint is the P=1 case
        kwargs.setdefault("num_key_value_heads", d.get("num_attention_heads"))
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in kwargs
        ]
        if missing:
            raise ParScaleError(f"config.json lacks required field(s): {', '.join(missing)}")
        try:
            cfg = cls(**kwargs)
        except (TypeError, ZeroDivisionError) as e:  # e.g. a string where a number belongs, or 0 heads
            raise ParScaleError(f"config.json is invalid: {e}") from None
        cfg.check()
        return cfg

    @classmethod
    def load(cls, model_dir: str | Path) -> ParScaleConfig:
        """Read `config.json` from a checkpoint folder."""
        path = Path(model_dir) / "config.json"
        return cls.from_dict(read_json(path, missing=f"{path} not found: a checkpoint folder needs a config.json"))

    def check(self) -> None:
        """Refuse shapes the graph cannot be built for."""
        ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ParScaleError(f"config.json: {name} must be a positive integer, got {v!r}")
        if not isinstance(self.parscale_n, int) or self.parscale_n < 1:
            raise ParScaleError(f"config.json: parscale_n must be >= 1, got {self.parscale_n!r}")
        if self.parscale_n > 1 and (
            not isinstance(self.parscale_n_tokens, int) or self.parscale_n_tokens < 0
        ):
            raise ParScaleError(
                f"config.json: parscale_n_tokens must be >= 0, got {self.parscale_n_tokens!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ParScaleError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ParScaleError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def P(self) -> int:  # noqa: N802 - the paper's name
        return self.parscale_n

    @property
    def n_prefix(self) -> int:
        """Prefix key/value entries per stream and layer (none for P=1)."""
        return self.parscale_n_tokens if self.parscale_n > 1 else 0

    @property
    def cache_heads(self) -> int:
        """KV heads as a runtime sees them: the P streams appear as extra heads."""
        return self.parscale_n * self.num_key_value_heads

    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)


def read_json(path: Path, *, missing: str) -> Any:
    """A JSON file's contents; `missing` is the error message when the file does not exist."""
    if not path.is_file():
        raise ParScaleError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParScaleError(f"{path} is not valid JSON ({e})") from None
