"""Model configuration: the subset of a Qwen2 / ParScale `config.json` that the graph depends on.

Torch-free, so that both the exporter and the runtime can read a checkpoint's configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parscale.errors import ParScaleError

SUPPORTED_MODEL_TYPES = ("qwen2_parscale", "qwen2")
STORED_DTYPES = ("float32", "bfloat16", "float16")  # what a checkpoint's safetensors may hold

# Ranges of the config.json values (checked in `ParScaleConfig.check`, the one place). Each bound is far
# beyond any published Qwen2 / ParScale checkpoint (Qwen2.5-1M: 1,010,000 positions, vocabularies of
# 152k) and keeps every shape an ONNX dimension and an int32 token id: a value past it is a typo.
MAX_CONTEXT = 1 << 24
MAX_VOCAB = 1 << 24
MAX_SIZE = 1 << 20  # hidden_size, intermediate_size, heads, head_dim
MAX_LAYERS = 4096
MAX_STREAMS = 64  # parscale_n
MAX_PREFIX = 1 << 16  # parscale_n_tokens


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
        heads, hidden = self.num_attention_heads, self.hidden_size
        if not self.head_dim and _is_int(heads) and _is_int(hidden) and heads > 0:  # else check() names the field
            object.__setattr__(self, "head_dim", hidden // heads)

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
        window = d.get("use_sliding_window")
        if window is not None and not isinstance(window, bool):
            raise ParScaleError(f"config.json: use_sliding_window must be true or false, got {window!r}")
        if window:
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
        cfg = cls(**kwargs)
        cfg.check()
        return cfg

    @classmethod
    def load(cls, model_dir: str | Path) -> ParScaleConfig:
        """Read `config.json` from a checkpoint folder."""
        path = check_folder(model_dir, "model folder") / "config.json"
        return cls.from_dict(read_json(path, missing=f"{path} not found: a checkpoint folder needs a config.json"))

    def check(self) -> None:
        """Refuse any value the graph cannot be built for or a runtime would refuse, naming the field.

        Types are exact (a bool is not a number, "512" is not an integer) and ranges are checked, so
        that nothing the exporter writes is refused later by a runtime, or runs wrong.
        """
        sizes = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_SIZE, "intermediate_size": MAX_SIZE,
                 "num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_SIZE, "num_key_value_heads": MAX_SIZE,
                 "head_dim": MAX_SIZE, "max_position_embeddings": MAX_CONTEXT, "parscale_n": MAX_STREAMS}
        for name, most in sizes.items():
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= most:
                raise ParScaleError(f"config.json: {name} must be an integer in [1, {most}], got {v!r}")
        least = 1 if self.parscale_n > 1 else 0  # P streams need their prefix; P=1 ignores it
        if not _is_int(self.parscale_n_tokens) or not least <= self.parscale_n_tokens <= MAX_PREFIX:
            raise ParScaleError(f"config.json: parscale_n_tokens must be an integer in [{least}, {MAX_PREFIX}] "
                                f"(P={self.parscale_n}), got {self.parscale_n_tokens!r}")
        for name, lo, hi, open_lo in (("rms_norm_eps", 0.0, 1.0, True), ("rope_theta", 0.0, 1e12, True),
                                      ("parscale_attn_smooth", 0.0, 1.0, False)):
            v = getattr(self, name)
            if not _is_number(v) or not (lo < v if open_lo else lo <= v) or v > hi:
                span = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
                raise ParScaleError(f"config.json: {name} must be a number in {span}, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ParScaleError(f"config.json: tie_word_embeddings must be true or false, got "
                                f"{self.tie_word_embeddings!r}")
        if self.torch_dtype not in STORED_DTYPES:
            raise ParScaleError(f"config.json: torch_dtype must be one of {', '.join(STORED_DTYPES)}, got "
                                f"{self.torch_dtype!r}")
        vocab = self.vocab_size

        def is_id(e: Any) -> bool:
            return _is_int(e) and 0 <= e < vocab

        if self.bos_token_id is not None and not is_id(self.bos_token_id):
            raise ParScaleError(f"config.json: bos_token_id must be a token id in [0, {vocab - 1}] (the vocabulary), "
                                f"got {self.bos_token_id!r}")
        eos = self.eos_token_id
        if eos is not None and not (is_id(eos) or (isinstance(eos, list) and eos and all(map(is_id, eos)))):
            raise ParScaleError(f"config.json: eos_token_id must be a token id in [0, {vocab - 1}] (the vocabulary) "
                                f"or a non-empty list of them, got {eos!r}")
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

    def at(self, P: int) -> ParScaleConfig:  # noqa: N803
        """The config of the same backbone at P streams (prefix length and smoothing unchanged)."""
        return dataclasses.replace(self, parscale_n=P)

    @property
    def n_prefix(self) -> int:
        """Prefix key/value entries per stream and layer (none for P=1)."""
        return self.parscale_n_tokens if self.parscale_n > 1 else 0

    @property
    def cache_heads(self) -> int:
        """KV heads as a runtime sees them: the P streams appear as extra heads."""
        return self.parscale_n * self.num_key_value_heads


_STREAMS_TEXT = re.compile(r"[0-9]+(,[0-9]+)*")


@dataclass(frozen=True)
class Streams:
    """The stream counts (P) a command works with: distinct, sorted, each in [1, MAX_STREAMS].

    Parsed once at the edge (`parse`), then carried as is through export, runtime and CLI;
    `pick` is the one "serves this P" check.
    """

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        values = self.values
        if not values:
            raise ParScaleError("give at least one P (stream count)")
        bad = [v for v in values if not _is_int(v) or not 1 <= v <= MAX_STREAMS]
        if bad:
            raise ParScaleError(f"P must be an integer in [1, {MAX_STREAMS}], got {bad[0]!r}")
        if len(set(values)) != len(values):
            raise ParScaleError(f"each P may appear once, got {', '.join(map(str, values))}")
        object.__setattr__(self, "values", tuple(sorted(values)))

    @classmethod
    def parse(cls, value: str | int | Sequence[int] | Streams, option: str = "--P") -> Streams:
        """"2,4,8", 4, [2, 4] or a Streams -> Streams; anything else names `option` and the expected form."""
        if isinstance(value, Streams):
            return value
        if isinstance(value, str):
            text = value.replace(" ", "")
            if not _STREAMS_TEXT.fullmatch(text):
                raise ParScaleError(f"{option} must be comma-separated positive integers such as 1,2,4,8; "
                                    f"got {value!r}")
            values = [int(t) for t in text.split(",")]
            if len(set(values)) != len(values):
                raise ParScaleError(f"{option} names a P twice: {value!r}")
            if any(v < 1 for v in values):
                raise ParScaleError(f"{option} must be comma-separated positive integers such as 1,2,4,8; "
                                    f"got {value!r}")
            return cls(tuple(values))
        if _is_int(value):
            return cls((value,))
        if isinstance(value, (list, tuple)):
            return cls(tuple(value))
        raise ParScaleError(f"{option} must be a stream count or a list of them, got {value!r}")

    @property
    def largest(self) -> int:
        return self.values[-1]

    def pick(self, P: Any, where: str = "this export") -> int:  # noqa: N803
        """`P` (None: the largest, the default) if it is one of these, else a ParScaleError naming them."""
        if P is None:
            return self.largest
        if isinstance(P, numbers.Integral) and not isinstance(P, bool) and P in self.values:
            return int(P)  # numpy integers too: a P read from an array
        hint = ("" if len(self) > 1 else
                "; it is a single-P export (`parscale export CKPT --P 1,2,4,8` makes one serving several P)")
        raise ParScaleError(f"{where} serves P = {self}; got P={P!r}{hint}")

    def __iter__(self) -> Iterator[int]:
        return iter(self.values)

    def __getitem__(self, i: int) -> int:
        return self.values[i]

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, P: object) -> bool:  # noqa: N803
        return P in self.values

    def __str__(self) -> str:
        return ", ".join(map(str, self.values))


def check_folder(path: str | Path, what: str) -> Path:
    """`path` if it is a folder; else a ParScaleError saying what it is instead (missing, or a file)."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise ParScaleError(f"{what} {path} is a file, not a folder: give the folder that holds the model's files")
    raise ParScaleError(f"{what} {path} does not exist")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_json(path: Path, *, missing: str) -> Any:
    """A JSON file's contents; `missing` is the error message when the file does not exist."""
    if not path.is_file():
        raise ParScaleError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParScaleError(f"{path} is not valid JSON ({e})") from None
