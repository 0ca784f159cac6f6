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
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ParScaleError(
            f"{folder} was written by a newer parscale (format {manifest['format_version']}); upgrade parscale"
        )
    return manifest


def check_files(folder: str | Path, manifest: dict[str, Any], *, checksums: bool = False) -> None:
    """Raise if a file listed in the manifest is missing or differs in size (or in sha256)."""
    folder = Path(folder)
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ParScaleError(f"{folder}: {name} is listed in {MANIFEST} but missing; re-export the model")
        if path.stat().st_size != info["bytes"]:
            raise ParScaleError(
                f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says {info['bytes']}: "
                "the folder was modified or copied incompletely; re-export the model"
            )
        if checksums and file_digest(path) != info["sha256"]:
            raise ParScaleError(f"{folder}: {name} does not match its sha256 in {MANIFEST}; re-export")
