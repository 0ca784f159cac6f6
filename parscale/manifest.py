"""An export's manifest (`parscale.json`): what the folder holds and how it was made.

Shared by the exporter (writes it) and the runtime (reads and checks it); torch-free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from parscale.errors import ParScaleError

MANIFEST = "parscale.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = MODEL_FILE + ".data"  # the weights of graphs above the external-data threshold
FORMAT = "parscale-export"
FORMAT_VERSION = 1


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in the folder except the manifest itself."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load an export's manifest, refusing folders that are not parscale exports."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ParScaleError(f"export folder {folder} does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        raise ParScaleError(f"{folder} is not a parscale export (no {MANIFEST}); run `parscale export` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ParScaleError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ParScaleError(f"{path} is not a parscale export manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ParScaleError(f"{path}: format_version must be an integer, got {version!r}; re-export the model")
    if version > FORMAT_VERSION:
        raise ParScaleError(
            f"{folder} was written by a newer parscale (format {manifest['format_version']}); upgrade parscale"
        )
    return manifest


# Fields of manifest["model"] the runtime relies on: each must be a positive integer.
RUNTIME_FIELDS = ("P", "num_hidden_layers", "cache_heads", "head_dim", "vocab_size", "max_position_embeddings")


def model_fields(folder: str | Path, manifest: dict[str, Any]) -> dict[str, int]:
    """The manifest's `model` fields the runtime uses, type-checked: a clear error for null/missing/wrong."""
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise ParScaleError(f"{folder}: {MANIFEST} has no model description; re-export the model")
    bad = [f"{k}={model.get(k)!r}" for k in RUNTIME_FIELDS
           if isinstance(model.get(k), bool) or not isinstance(model.get(k), int) or model.get(k) < 1]
    if bad:
        raise ParScaleError(
            f"{folder}: {MANIFEST} field(s) {', '.join(bad)} must be positive integers; the manifest was "
            "edited or damaged: re-export the model"
        )
    return {k: model[k] for k in RUNTIME_FIELDS}


def listed_files(folder: str | Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's file list, type-checked (plain names, integer sizes), so that checks cannot crash."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ParScaleError(f"{folder}: {MANIFEST} lists no files; re-export the model")
    for name, info in files.items():
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ParScaleError(f"{folder}: {MANIFEST} lists {name!r}, which is not a file name in the folder")
        if (not isinstance(info, dict) or isinstance(info.get("bytes"), bool) or not isinstance(info.get("bytes"), int)
                or not isinstance(info.get("sha256", ""), str)):
            raise ParScaleError(f"{folder}: {MANIFEST} entry for {name} is malformed; re-export the model")
    return files


def check_files(folder: str | Path, manifest: dict[str, Any], *, checksums: bool = True) -> None:
    """Raise unless every file listed in the manifest exists with its size and (`checksums`) its sha256.

    Sizes are always compared (free); hashing reads every byte (sha256, about 1.4 GB/s per core here).
    """
    folder = Path(folder)
    files = listed_files(folder, manifest)
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise ParScaleError(f"{folder}: {name} is listed in {MANIFEST} but missing; re-export the model")
        if path.stat().st_size != info["bytes"]:
            raise ParScaleError(
                f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says {info['bytes']}: "
                "the folder was modified or copied incompletely; re-export the model"
            )
    if not checksums:
        return
    for name, info in files.items():
        if "sha256" not in info:
            raise ParScaleError(f"{folder}: {MANIFEST} has no sha256 for {name}; re-export, or skip the check "
                                "with --no-verify")
        try:
            digest = file_digest(folder / name)
        except OSError as e:
            raise ParScaleError(f"{folder}: cannot read {name}: {e.strerror}") from None
        if digest != info["sha256"]:
            raise ParScaleError(
                f"{folder}: {name} does not match its sha256 in {MANIFEST}: the file is damaged or was "
                "modified; re-export the model (or copy it again)"
            )
