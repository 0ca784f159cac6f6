"""An export's manifest (`parscale.json`), typed: what the folder holds and how it was made.

Shared by the exporter (writes it) and the runtime (reads and checks it); torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parscale.config import ParScaleConfig, Streams, check_folder, read_json
from parscale.errors import ParScaleError

MANIFEST = "parscale.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = MODEL_FILE + ".data"  # the weights of graphs above the external-data threshold
FORMAT = "parscale-export"
# 2: the fused graph (GroupQueryAttention, prefix rows in the KV cache, shared past/present buffer).
# 3: one graph serving several P over one backbone (io.cache.streams).
# 4: `logits` holds the last position only, `kept_logits` the last num_logits_to_keep (default 1), for
#    one graph serving one P or several (io.cache.streams tells); formats 2 and 3 are re-exported.
FORMAT_VERSION = 4


def feed_file(digest: Any, path: str | Path, start: int = 0, length: int | None = None) -> int:
    """Feed `length` bytes of `path` from `start` (None: to its end) to a hashlib `digest`, 16 MiB at a
    time: the one loop that hashes files. Returns the bytes fed (fewer than `length`: the file is short)."""
    fed = 0
    with open(path, "rb") as f:
        f.seek(start)
        while length is None or fed < length:
            chunk = f.read(1 << 24 if length is None else min(length - fed, 1 << 24))
            if not chunk:
                break
            digest.update(chunk)
            fed += len(chunk)
    return fed


def file_digest(path: str | Path) -> str:
    """The sha256 of a file, as hex."""
    digest = hashlib.sha256()
    feed_file(digest, path)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file in the folder except the manifest itself."""
    return {
        p.name: FileEntry(bytes=p.stat().st_size, sha256=file_digest(p))
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


@dataclass(frozen=True)
class ModelInfo:
    """`model` in the manifest: what a runtime needs to know about the network (from config.json)."""

    model_type: str
    P: int
    prefix_tokens: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    cache_heads: int  # P * num_key_value_heads: the graph's cache heads
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: ParScaleConfig) -> ModelInfo:
        return cls(model_type=cfg.model_type, P=cfg.P, prefix_tokens=cfg.n_prefix,
                   num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                   num_key_value_heads=cfg.num_key_value_heads, cache_heads=cfg.cache_heads, head_dim=cfg.head_dim,
                   hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
                   max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)

    def runtime_fields(self) -> dict[str, int]:
        """The fields the runtime sizes things by, each checked against the graph and config.json on load."""
        return {k: getattr(self, k) for k in RUNTIME_FIELDS}


@dataclass(frozen=True)
class FileEntry:
    """One file of the export folder, as listed in the manifest."""

    bytes: int
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    """An export's `parscale.json`, typed. `to_dict` gives the JSON layout; `read` type-checks it."""

    model: ModelInfo
    dtype: str  # "fp32" or "fp16"
    opset: int
    io: dict[str, Any]  # the graph's input and output names and axes (parscale.contract)
    source: dict[str, Any]  # the checkpoint's folder name and sha256
    tool: dict[str, Any]
    quantization: dict[str, Any] | None = None  # exporter.quant.policy.QuantReport.to_dict()
    validation: dict[str, Any] | None = None  # what the export measured against PyTorch and the float graph
    web: dict[str, Any] | None = None  # whether the in-browser page can run it (exporter/browser.py)
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    @property
    def streams(self) -> Streams:
        """The P this export serves: several for a multi-P export (io.cache.streams), else model.P."""
        streams = self.io.get("cache", {}).get("streams") if isinstance(self.io.get("cache"), dict) else None
        # Checked by from_dict: at least two distinct P, the largest model.P.
        return Streams(tuple(streams) if isinstance(streams, list) and streams else (self.model.P,))

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version, "tool": self.tool,
                             "model": dataclasses.asdict(self.model), "dtype": self.dtype, "opset": self.opset,
                             "quantization": self.quantization, "io": self.io, "source": self.source}
        if self.validation is not None:
            d["validation"] = self.validation
        if self.web is not None:
            d["web"] = self.web
        if self.files:
            d["files"] = {name: {k: v for k, v in dataclasses.asdict(f).items() if v is not None}
                          for name, f in self.files.items()}
        return d

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """Load and type-check an export's manifest, refusing folders that are not parscale exports."""
        folder = Path(folder)
        return cls.from_dict(_load_json(folder), folder)

    @classmethod
    def from_dict(cls, d: dict[str, Any], folder: str | Path = ".") -> Manifest:
        """Type-check a manifest's JSON: a clear error naming the field for anything null, missing or wrong."""
        model = d.get("model")
        if not isinstance(model, dict):
            raise ParScaleError(f"{folder}: {MANIFEST} has no model description; re-export the model")
        bad = [f"{k}={model.get(k)!r}" for k in RUNTIME_FIELDS
               if isinstance(model.get(k), bool) or not isinstance(model.get(k), int) or model.get(k) < 1]
        if bad:
            raise ParScaleError(
                f"{folder}: {MANIFEST} field(s) {', '.join(bad)} must be positive integers; the manifest was "
                "edited or damaged: re-export the model"
            )
        types = {f.name: f.type for f in dataclasses.fields(ModelInfo)}
        wrong = [k for k, t in types.items() if not _is(model.get(k), t)]
        if wrong:
            raise ParScaleError(f"{folder}: {MANIFEST} model field(s) {', '.join(wrong)} are missing or of the "
                                "wrong type; re-export the model")
        for key, kind in (("dtype", str), ("opset", int), ("io", dict), ("source", dict), ("tool", dict)):
            if not _is(d.get(key), kind.__name__):
                raise ParScaleError(f"{folder}: {MANIFEST} field {key} is missing or not a {kind.__name__}; "
                                    "re-export the model")
        for key in ("quantization", "validation", "web"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ParScaleError(f"{folder}: {MANIFEST} field {key} is not an object; re-export the model")
        _check_cache(folder, d["io"], model)
        return cls(model=ModelInfo(**{k: model[k] for k in types}), dtype=d["dtype"], opset=d["opset"], io=d["io"],
                   source=d["source"], tool=d["tool"], quantization=d.get("quantization"),
                   validation=d.get("validation"), web=d.get("web"), files=_files(folder, d.get("files", {})),
                   format_version=d["format_version"])


def _check_cache(folder: str | Path, io: dict[str, Any], model: dict[str, Any]) -> None:
    """io.cache, which sizes the cache and says which P a graph serves: absent, or exactly as the exporter
    writes it (streams: at least two distinct positive integers, ascending, the largest model.P, and
    cache_heads = P * kv_heads_per_stream; prefix_rows a non-negative integer)."""
    cache = io.get("cache")
    if cache is None:
        return
    bad = f"{folder}: {MANIFEST} field io.cache"

    def count(v: Any, minimum: int = 1) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

    if not isinstance(cache, dict):
        raise ParScaleError(f"{bad} is not an object; re-export the model")
    if "prefix_rows" in cache and not count(cache["prefix_rows"], 0):
        raise ParScaleError(f"{bad}.prefix_rows={cache['prefix_rows']!r} is not a non-negative integer; "
                            "re-export the model")
    if "streams" not in cache and "kv_heads_per_stream" not in cache:
        return
    streams, kv = cache.get("streams"), cache.get("kv_heads_per_stream")
    if (not isinstance(streams, list) or len(streams) < 2 or not all(count(p) for p in streams)
            or streams != sorted(set(streams)) or streams[-1] != model["P"]):
        raise ParScaleError(
            f"{bad}.streams={streams!r} is not what parscale writes (two or more distinct positive integers, "
            f"ascending, the largest equal to model.P={model['P']}): the manifest was edited; re-export the model")
    if not count(kv) or kv * streams[-1] != model["cache_heads"]:
        raise ParScaleError(f"{bad}.kv_heads_per_stream={kv!r} does not give model.cache_heads="
                            f"{model['cache_heads']} at P={streams[-1]}: the manifest was edited; re-export the model")


def _is(value: Any, type_name: str) -> bool:
    """isinstance against a dataclass field's annotation (a string under `from __future__ import annotations`)."""
    kinds = {"int": int, "str": str, "bool": bool, "dict": dict}
    if type_name != "bool" and isinstance(value, bool):
        return False
    return isinstance(value, kinds[type_name])


def _files(folder: str | Path, files: Any) -> dict[str, FileEntry]:
    """The manifest's file list, type-checked (plain names, integer sizes), so that checks cannot crash."""
    if not isinstance(files, dict):
        raise ParScaleError(f"{folder}: {MANIFEST} field files is not an object; re-export the model")
    out = {}
    for name, info in files.items():
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ParScaleError(f"{folder}: {MANIFEST} lists {name!r}, which is not a file name in the folder")
        if (not isinstance(info, dict) or isinstance(info.get("bytes"), bool) or not isinstance(info.get("bytes"), int)
                or not isinstance(info.get("sha256", ""), str)):
            raise ParScaleError(f"{folder}: {MANIFEST} entry for {name} is malformed; re-export the model")
        out[name] = FileEntry(bytes=info["bytes"], sha256=info.get("sha256"))
    return out


def _load_json(folder: Path) -> dict[str, Any]:
    check_folder(folder, "export folder")
    path = folder / MANIFEST
    missing = f"{folder} is not a parscale export (no {MANIFEST}); run `parscale export` first"
    manifest = read_json(path, missing=missing)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ParScaleError(f"{path} is not a parscale export manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ParScaleError(f"{path}: format_version must be an integer, got {version!r}; re-export the model")
    if version > FORMAT_VERSION:
        raise ParScaleError(f"{folder} was written by a newer parscale (format {version}); upgrade parscale")
    if version < FORMAT_VERSION:
        raise ParScaleError(f"{folder} was written by an older parscale (format {version}, whose graph drives "
                            f"differently); re-export it with this version (format {FORMAT_VERSION})")
    return manifest


# Fields of the model description the runtime relies on: each must be a positive integer.
RUNTIME_FIELDS = ("P", "num_hidden_layers", "cache_heads", "head_dim", "vocab_size", "max_position_embeddings")


def check_files(folder: str | Path, manifest: Manifest, *, checksums: bool = True) -> None:
    """Raise unless every file listed in the manifest exists with its size and (`checksums`) its sha256.

    Sizes are always compared (free); hashing reads every byte (sha256, about 1.4 GB/s per core here).
    """
    folder = Path(folder)
    if not manifest.files:
        raise ParScaleError(f"{folder}: {MANIFEST} lists no files; re-export the model")
    for name, info in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise ParScaleError(f"{folder}: {name} is listed in {MANIFEST} but missing; re-export the model")
        if path.stat().st_size != info.bytes:
            raise ParScaleError(
                f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says {info.bytes}: "
                "the folder was modified or copied incompletely; re-export the model"
            )
    if not checksums:
        return
    for name, info in manifest.files.items():
        if info.sha256 is None:
            raise ParScaleError(f"{folder}: {MANIFEST} has no sha256 for {name}; re-export, or skip the check "
                                "with verify=False (--no-verify)")
        try:
            digest = file_digest(folder / name)
        except OSError as e:
            raise ParScaleError(f"{folder}: cannot read {name}: {e.strerror}") from None
        if digest != info.sha256:
            raise ParScaleError(
                f"{folder}: {name} does not match its sha256 in {MANIFEST}: the file is damaged or was "
                "modified; re-export the model (or copy it again)"
            )


# What parscale may read from an export folder besides the graph: the configs and tokenizer files
# the exporter copies (exporter/files/sources.py SOURCE_FILES) and the chat template formats we know of.
# Each is read only when the manifest lists it (`listed_file`); one present but unlisted is refused.
READ_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)


def check_closed_list(folder: str | Path, manifest: Manifest) -> None:
    """Refuse a folder holding a file parscale would read (`READ_FILES`, model.onnx*) that the manifest
    does not list: its integrity could not be checked (a dropped-in tokenizer.json, an entry deleted)."""
    folder = Path(folder)
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise ParScaleError(f"cannot read {folder}: {e.strerror}") from None
    for name in names:
        if name not in manifest.files and (name in READ_FILES or name.startswith(MODEL_FILE)):
            raise _unlisted(folder, name)


def _unlisted(folder: Path, name: str) -> ParScaleError:
    return ParScaleError(
        f"{folder}: {name} is not listed in {MANIFEST}, so its integrity cannot be checked and it is not "
        f"read: the folder was edited or mixed from different exports. Remove {name} or re-export the model"
    )


def listed_file(folder: str | Path, name: str) -> Path | None:
    """`folder/name` for a reader of an export folder: None when absent and unlisted; refused when
    present but unlisted, or listed but missing, resized or altered (sha256). A folder without a
    manifest (a checkpoint) is not an export: its file is returned as it is, if present."""
    folder = Path(folder)
    path = folder / name
    if not (folder / MANIFEST).is_file():
        return path if path.is_file() else None
    manifest = Manifest.read(folder)
    info = manifest.files.get(name)
    if info is None:
        if path.exists() or path.is_symlink():
            raise _unlisted(folder, name)
        return None
    check_files(folder, manifest.replace(files={name: info}), checksums=info.sha256 is not None)
    return path
