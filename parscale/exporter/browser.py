"""Whether the in-browser page (web/, onnxruntime-web) can run an export: recorded in the manifest as `web`.

Checked at export time from the finished folder, so a browser is never needed to export:

- size: ONNX Runtime parses model.onnx as one protobuf message, which cannot exceed 2 GiB; and
  onnxruntime-web's WASM build (wasm32) addresses 4 GiB of memory in all, which must hold the
  weights (model.onnx and model.onnx.data are copied into it) besides the KV cache and activations.
  Either limit exceeded makes `runs` false with the reason, which the page shows instead of loading.
- operators: every operator of the graph (branches of `If` included) must be one that the browser
  tests ran in headless Chromium on onnxruntime-web's WASM backend (`BROWSER_OPERATORS`, from the
  fp32, fp16, int8 and int4 exports of tests/test_browser.py). Others are not known to fail, so they
  are listed as `warnings` (the page shows them and tries; onnxruntime-web names a missing kernel).

An export is never refused for the browser: the folder serves the native runtimes all the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parscale.exporter.graph.builder import MS_DOMAIN
from parscale.manifest import EXTERNAL_DATA, MODEL_FILE

# The package the page runs on, pinned by web/package-lock.json (through @huggingface/transformers).
ONNXRUNTIME_WEB_VERSION = "1.31.0-dev.20260914-8d85527a0"
PROTOBUF_LIMIT = 2**31  # bytes: the largest protobuf message, hence the largest model.onnx
WASM32_MEMORY = 2**32  # bytes: the whole memory of a wasm32 instance
# Operators (domain, type) that tests/test_browser.py runs on onnxruntime-web's WASM backend in Chromium.
BROWSER_OPERATORS = frozenset({
    *(("", op) for op in (
        "Abs", "Add", "Cast", "Concat", "Div", "Equal", "Expand", "Gather", "Greater", "Identity", "If", "MatMul",
        "Max", "Mul", "Neg", "QuantizeLinear", "ReduceMax", "ReduceSum", "Reshape", "Shape", "Sigmoid",
        "SimplifiedLayerNormalization", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Transpose", "Unsqueeze",
        "Where",
    )),
    *((MS_DOMAIN, op) for op in (
        "GatherBlockQuantized", "GroupQueryAttention", "MatMulIntegerToFloat", "MatMulNBits", "RotaryEmbedding",
        "SkipSimplifiedLayerNormalization",
    )),
})


def graph_operators(model_file: Path) -> set[tuple[str, str]]:
    """(domain, op_type) of every node of the graph, nested subgraphs included ("" = the ONNX domain)."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    found: set[tuple[str, str]] = set()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            found.add(("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type))
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    return found


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def browser_support(folder: Path, *, protobuf_limit: int = PROTOBUF_LIMIT, memory_limit: int = WASM32_MEMORY,
                    operators: frozenset[tuple[str, str]] = BROWSER_OPERATORS) -> dict[str, Any]:
    """The manifest's `web` record for the export in `folder`: runs, problems, warnings, weight bytes."""
    model = folder / MODEL_FILE
    data = folder / EXTERNAL_DATA
    weights = model.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    problems = []
    if model.stat().st_size >= protobuf_limit:
        problems.append(f"{MODEL_FILE} is {_gib(model.stat().st_size)}, over the {_gib(protobuf_limit)} a protobuf "
                        f"message can hold (export with the weights in {EXTERNAL_DATA})")
    if weights >= memory_limit:
        problems.append(f"the weights ({_gib(weights)}) do not fit in WebAssembly's {_gib(memory_limit)} of memory "
                        "(wasm32), which also holds the KV cache and activations: export a smaller model or int4")
    unknown = sorted(graph_operators(model) - operators)
    warnings = []
    if unknown:
        names = ", ".join(f"{d}.{op}" if d else op for d, op in unknown)
        warnings.append(f"operators not run in the browser tests (onnxruntime-web may lack them): {names}")
    return {"runs": not problems, "problems": problems, "warnings": warnings, "weights_bytes": weights,
            "checked_with": f"onnxruntime-web {ONNXRUNTIME_WEB_VERSION} (WASM)"}
