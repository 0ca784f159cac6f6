"""Trace a `ParScaleForCausalLM` into an ONNX graph that follows `parscale.contract`."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import Tensor, nn

from parscale import contract
from parscale.exporter.model import ParScaleForCausalLM
from parscale.exporter.optimize import optimize_graph


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


def trace_to_onnx(model: ParScaleForCausalLM, *, dtype: torch.dtype, opset: int) -> onnx.ModelProto:
    """Export `model` (already in `dtype`) to an in-memory ONNX proto with the contract's names."""
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
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    _name_axes(proto, n)
    _default_num_logits(proto)
    optimize_graph(proto)  # exact rewrites that let ONNX Runtime fuse more (RMSNorm)
    return proto


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
