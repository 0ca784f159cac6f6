"""What `Model.load` checks before running anything: files, weights, and the manifest against the graph.

A manifest is plain JSON that anyone can edit, and the runtime sizes its cache, vocabulary checks and
context limit from it. So every field it relies on is compared with two independent sources: the
graph itself (input/output shapes as ONNX Runtime reports them, and the copy of the manifest stored
in model.onnx's metadata, which the sha256 check protects) and the folder's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parscale import contract
from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.manifest import MANIFEST, MODEL_FILE, check_files, listed_files, model_fields
from parscale.runtime.weights import check_finite


def verify_folder(path: Path, manifest: dict[str, Any], *, verify: bool) -> dict[str, int]:
    """Check the folder against its manifest; returns the runtime fields. `verify`: hashes and weights too.

    Sizes and field types are always checked (free). With `verify`, every file's sha256 is compared
    (about 1.4 GB/s per core) and every floating-point weight is scanned for NaN/Inf.
    """
    fields = model_fields(path, manifest)
    if MODEL_FILE not in listed_files(path, manifest):
        raise ParScaleError(f"{path}: {MANIFEST} does not list {MODEL_FILE}; re-export the model")
    check_files(path, manifest, checksums=verify)
    if verify:
        check_finite(path / MODEL_FILE)
    return fields


def _mismatch(path: Path, key: str, ours: Any, source: str, theirs: Any) -> ParScaleError:
    return ParScaleError(
        f"{path}: {MANIFEST} says {key}={ours!r} but {source} says {theirs!r}: the folder was edited or mixed "
        "from different exports; re-export the model"
    )


def check_against_graph(path: Path, fields: dict[str, int], session: Any) -> None:
    """Compare the runtime fields with the graph's metadata copy and its input/output shapes."""
    meta = session.get_modelmeta().custom_metadata_map.get("parscale")
    if meta:
        try:
            graph_model = json.loads(meta).get("model", {})
        except (ValueError, AttributeError):
            graph_model = {}
        for key, value in fields.items():
            if key in graph_model and graph_model[key] != value:
                raise _mismatch(path, key, value, f"{MODEL_FILE}'s metadata", graph_model[key])
    layers = fields["num_hidden_layers"]
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    if len(past) != 2 * layers:
        raise _mismatch(path, "num_hidden_layers", layers, "the graph", len(past) // 2)
    if contract.past_key(0) not in inputs:
        raise ParScaleError(f"{path}: the graph has no input {contract.past_key(0)}; it is not a parscale export")
    shape = inputs[contract.past_key(0)].shape  # [batch, P * Hkv, past, head_dim]; symbolic axes are strings
    for axis, key in ((1, "cache_heads"), (3, "head_dim")):
        dim = shape[axis] if len(shape) > axis else None
        if isinstance(dim, int) and dim != fields[key]:
            raise _mismatch(path, key, fields[key], "the graph's cache shape", dim)
    logits = outputs.get(contract.LOGITS)
    dim = logits.shape[-1] if logits is not None and logits.shape else None
    if isinstance(dim, int) and dim != fields["vocab_size"]:
        raise _mismatch(path, "vocab_size", fields["vocab_size"], "the graph's logits shape", dim)


def check_against_config(path: Path, fields: dict[str, int]) -> None:
    """Compare the runtime fields with the config.json copied into the export (when present)."""
    if not (path / "config.json").is_file():
        return
    cfg = ParScaleConfig.load(path)
    theirs = {
        "P": cfg.P, "num_hidden_layers": cfg.num_hidden_layers, "cache_heads": cfg.cache_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
    }
    for key, value in fields.items():
        if theirs.get(key, value) != value:
            raise _mismatch(path, key, value, "config.json", theirs[key])
