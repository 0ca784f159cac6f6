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

from parscale.config import ParScaleConfig, Streams
from parscale.driver import GraphInfo
from parscale.errors import ParScaleError
from parscale.manifest import MANIFEST, MODEL_FILE, Manifest, check_closed_list, check_files, listed_file
from parscale.runtime.finite_weights import check_finite


def verify_folder(path: Path, manifest: Manifest, *, verify: bool) -> None:
    """Check the folder against its manifest. `verify`: hashes and weights too.

    Sizes and field types are always checked (free). With `verify`, every file's sha256 is compared
    (about 1.4 GB/s per core) and every floating-point weight is scanned for NaN/Inf.
    """
    if MODEL_FILE not in manifest.files:
        raise ParScaleError(f"{path}: {MANIFEST} does not list {MODEL_FILE}; re-export the model")
    check_closed_list(path, manifest)  # a file we would read but the manifest does not list: refused
    check_files(path, manifest, checksums=verify)
    if verify:
        check_finite(path / MODEL_FILE)


def _mismatch(path: Path, key: str, ours: Any, source: str, theirs: Any) -> ParScaleError:
    return ParScaleError(
        f"{path}: {MANIFEST} says {key}={ours!r} but {source} says {theirs!r}: the folder was edited or mixed "
        "from different exports; re-export the model"
    )


def check_against_graph(path: Path, fields: dict[str, int], session: Any,
                        manifest: Manifest | None = None) -> GraphInfo:
    """Compare the runtime fields with the graph's metadata copy and its input/output shapes; with
    `manifest`, also its whole `model` and `io` (the cache's streams, prefix rows, names) and dtype.

    Returns what the graph says about itself, for driving it.
    """
    meta = session.get_modelmeta().custom_metadata_map.get("parscale")
    if meta:
        try:
            graph = json.loads(meta)
            graph_model = graph.get("model", {})
        except (ValueError, AttributeError):
            graph, graph_model = {}, {}
        for key, value in fields.items():
            if key in graph_model and graph_model[key] != value:
                raise _mismatch(path, key, value, f"{MODEL_FILE}'s metadata", graph_model[key])
        if manifest is not None and isinstance(graph, dict):
            ours = manifest.to_dict()
            for section in ("model", "io", "dtype"):
                if section in graph and graph[section] != ours[section]:
                    key, a, b = _first_difference(section, ours[section], graph[section])
                    raise _mismatch(path, key, a, f"{MODEL_FILE}'s metadata", b)
    try:
        info = GraphInfo.of(session)
    except ParScaleError as e:
        raise ParScaleError(f"{path}: {e}") from None
    for key, got, where in (("num_hidden_layers", info.num_layers, "the graph"),
                            ("cache_heads", info.cache_heads, "the graph's cache shape"),
                            ("head_dim", info.head_dim, "the graph's cache shape"),
                            ("vocab_size", info.vocab_size, "the graph's logits shape")):
        if got != fields[key]:
            raise _mismatch(path, key, fields[key], where, got)
    graph_streams = info.streams or Streams((fields["P"],))
    if manifest is not None and graph_streams != manifest.streams:
        raise _mismatch(path, "io.cache.streams", list(manifest.streams), "the graph", list(graph_streams))
    return info


def _first_difference(key: str, ours: Any, theirs: Any) -> tuple[str, Any, Any]:
    """The dotted key of the first difference between two JSON values, and both values there."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k in sorted(set(ours) | set(theirs), key=str):
            if ours.get(k) != theirs.get(k):
                return _first_difference(f"{key}.{k}", ours.get(k), theirs.get(k))
    return key, ours, theirs


def check_against_config(path: Path, fields: dict[str, int]) -> ParScaleConfig | None:
    """Compare the runtime fields with the config.json copied into the export; returns it (None when absent)."""
    if listed_file(path, "config.json") is None:
        return None
    cfg = ParScaleConfig.load(path)
    theirs = {
        "P": cfg.P, "num_hidden_layers": cfg.num_hidden_layers, "cache_heads": cfg.cache_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
    }
    for key, value in fields.items():
        if theirs.get(key, value) != value:
            raise _mismatch(path, key, value, "config.json", theirs[key])
    return cfg
