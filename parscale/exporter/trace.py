"""Trace a `ParScaleForCausalLM` into an ONNX graph that follows `parscale.contract`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import torch
from onnxscript import optimizer
from torch import Tensor, nn

from parscale import contract
from parscale.exporter.optimize import optimize_graph
from parscale.manifest import EXTERNAL_DATA, MODEL_FILE
from parscale.modeling.model import ParScaleForCausalLM

# Constants larger than this (elements) are weights: onnxscript's own limit for constant folding.
_FOLD_LIMIT = 8192


class _FlatSignature(nn.Module):
    """The contract's flat input/output lists around the module's structured forward."""

    def __init__(self, model: ParScaleForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
        past: tuple[Tensor, ...], num_logits_to_keep: Tensor,
    ) -> tuple[Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.model(
            input_ids, attention_mask, position_ids, cache, num_logits_to_keep
        )
        return (logits, *[t for kv in presents for t in kv])


def example_inputs(model: ParScaleForCausalLM, dtype: torch.dtype) -> tuple:
    """Batch 2 with a non-empty past: a batch-1 example bakes broadcasts that fail at batch 2."""
    cfg = model.cfg
    b, s, past = 2, 3, 4
    cache = tuple(
        torch.zeros(b, cfg.cache_heads, past, cfg.head_dim, dtype=dtype)
        for _ in range(2 * cfg.num_hidden_layers)
    )
    return (
        torch.zeros(b, s, dtype=torch.int64),
        torch.ones(b, past + s, dtype=torch.int64),
        torch.arange(past, past + s, dtype=torch.int64).repeat(b, 1),
        cache,
        torch.tensor(0, dtype=torch.int64),
    )


def trace_to_folder(
    model: ParScaleForCausalLM, folder: Path, *, dtype: torch.dtype, opset: int, external_threshold: int,
) -> int:
    """Export `model` to `folder/model.onnx`; returns the bytes of the graph's weights.

    Weights above `external_threshold` bytes in total go to `model.onnx.data`, written one tensor
    at a time: beside the module, the trace needs memory for one weight, not a copy of them all.
    """
    graph = _trace_ir(model, dtype=dtype, opset=opset)
    weight_bytes = sum(v.const_value.nbytes for v in graph.graph.initializers.values() if v.const_value is not None)
    path = folder / MODEL_FILE
    external = weight_bytes > external_threshold
    ir.save(graph, path, external_data=EXTERNAL_DATA if external else None, size_threshold_bytes=1024,
            max_workers=1, max_in_flight_bytes=256 << 20)
    # onnxscript's rewrite rules keep the last graph they matched in module-level state; without its
    # tensors that graph no longer keeps the module's weights alive after the module is dropped.
    for value in graph.graph.initializers.values():
        value.const_value = None
    del graph
    proto = onnx.load(str(path), load_external_data=False)  # structure only: the weights stay on disk
    finish_graph(proto, model.cfg.num_hidden_layers)
    onnx.save_model(proto, str(path))  # tensors already on disk are referenced, not rewritten
    return weight_bytes


def finish_graph(proto: onnx.ModelProto, num_layers: int) -> None:
    """Contract names for the axes, an optional `num_logits_to_keep`, and exact fusion-friendly rewrites."""
    _name_axes(proto, num_layers)
    _default_num_logits(proto)
    optimize_graph(proto)  # exact rewrites that let ONNX Runtime fuse more (RMSNorm)


def _trace_ir(model: ParScaleForCausalLM, *, dtype: torch.dtype, opset: int) -> ir.Model:
    n = model.cfg.num_hidden_layers
    auto = torch.export.Dim.AUTO
    kv_axes = {0: auto, 2: auto}
    dynamic_shapes = (
        {0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto},
        tuple(kv_axes for _ in range(2 * n)), None,
    )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # torch.onnx logs every pass at INFO/WARNING; our CLI reports its own stages.
        for name in ("torch.onnx", "torch.export", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            _FlatSignature(model),
            example_inputs(model, dtype),
            dynamo=True,
            opset_version=opset,
            input_names=contract.input_names(n),
            output_names=contract.output_names(n),
            dynamic_shapes=dynamic_shapes,
            optimize=False,  # done below, without materialising transposed copies of the weights
            verbose=False,
        )
        graph = program.model
        del program
        optimizer.optimize_ir(graph, should_fold=_not_weight_transposes)
    weights_as_copies(graph)
    return graph


def _is_weight_transpose(node: ir.Node) -> bool:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    src = node.inputs[0]
    return (src is not None and src.is_initializer() and src.const_value is not None
            and src.const_value.size > _FOLD_LIMIT and len(src.uses()) == 1)


def _not_weight_transposes(node: ir.Node) -> bool | None:
    """Keep the optimizer from folding Transpose(weight): it would hold a transposed copy of every weight."""
    return False if _is_weight_transpose(node) else None


def weights_as_copies(graph: ir.Model) -> int:
    """Make every weight an initializer computed when it is written, from a copy of the module's tensor.

    Each Transpose of a weight becomes a (K, N) initializer, as constant folding would make it, but
    the transposed copy exists only while it is written to disk. The module's own tensors are never
    handed to numpy (which would pin their memory), so `checkpoint.release` can free them however
    many references the exporter's caches keep. Returns the number of weights rewritten.
    """
    g = graph.graph
    done = 0
    for node in [n for n in g if _is_weight_transpose(n)]:
        src, out = node.inputs[0], node.outputs[0]
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
        perm = perm or tuple(reversed(range(len(src.const_value.shape))))
        value = ir.Value(name=out.name, type=ir.TensorType(src.const_value.dtype))
        value.const_value = _copy(src.const_value, perm, out.name)
        value.shape = value.const_value.shape
        g.remove(node)
        src.const_value = None
        out.name = None
        g.register_initializer(value)
        ir.convenience.replace_all_uses_with(out, value)
        del g.initializers[src.name]
        done += 1
    for value in g.initializers.values():
        if value.const_value is not None and isinstance(value.const_value.raw, torch.Tensor):
            value.const_value = _copy(value.const_value, None, value.name)
            done += 1
    return done


def _copy(tensor: ir.TensorProtocol, perm: tuple[int, ...] | None, name: str | None) -> ir.LazyTensor:
    raw: torch.Tensor = tensor.raw  # type: ignore[attr-defined]
    shape = ir.Shape([raw.shape[i] for i in perm] if perm else list(raw.shape))

    def compute() -> ir.Tensor:
        t = raw.detach().permute(perm) if perm else raw.detach()
        return ir.Tensor(t.clone(memory_format=torch.contiguous_format).numpy(), name=name)

    return ir.LazyTensor(compute, dtype=tensor.dtype, shape=shape, name=name)


def _name_axes(proto: onnx.ModelProto, num_layers: int) -> None:
    """Give the dynamic axes the contract's names (the tracer invents its own)."""
    axes = contract.axes(num_layers)
    for value in [*proto.graph.input, *proto.graph.output]:
        names = axes.get(value.name)
        if names is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, names, strict=False):
            if not dim.HasField("dim_value"):
                dim.dim_param = name


def _default_num_logits(proto: onnx.ModelProto) -> None:
    """Make `num_logits_to_keep` optional: an initializer of the same name supplies 0 (all logits).

    Runtimes that know the input (ours, transformers.js) pass it; others (onnxruntime-genai) need not.
    """
    default = onnx.numpy_helper.from_array(np.array(0, dtype=np.int64), contract.NUM_LOGITS_TO_KEEP)
    proto.graph.initializer.append(default)
