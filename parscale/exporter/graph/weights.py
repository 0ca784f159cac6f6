"""The PyTorch module's tensors written into the graph: converted to the graph's dtype one at a time,
projections stored transposed and marked for quantization."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from parscale.exporter.graph.builder import QUANT_KEY, GraphBuilder

ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}
NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16}


class WeightWriter:
    """A GraphBuilder's weights in one float dtype, and the quantization marks of the nodes that read them.

    `quant_meta`: node name -> metadata; a MatMul or Gather carrying `QUANT_KEY` names the weight it
    reads and the calibration statistics GPTQ uses for it (`parscale.exporter.quant.rewrite`)."""

    def __init__(self, builder: GraphBuilder, dtype: torch.dtype) -> None:
        self.b, self.dtype = builder, dtype
        self.np_dtype = NP_DTYPE[dtype]
        self.onnx_dtype = ONNX_DTYPE[dtype]
        self.quant_meta: dict[str, dict[str, str]] = {}

    def tensor(self, name: str, t: torch.Tensor) -> str:
        """An initializer holding `t` in the graph's dtype."""
        return self.b.weight(name, t.detach().to(self.dtype).contiguous().numpy())

    def mark(self, weight: str, calib: str) -> None:
        """Mark the node just added as quantizable: it reads `weight`; GPTQ calibrates it on `calib`."""
        self.quant_meta[self.b.nodes[-1].name] = {QUANT_KEY: f"{weight}|{calib}"}

    def linear(self, x: str, weight: torch.Tensor, name: str, calib: str | None,
               bias: torch.Tensor | None = None) -> str:
        """x @ W^T (+ bias): W (N, K) stored transposed as (K, N), as quantization expects."""
        w = self.b.weight(name + ".weight", weight.detach().to(self.dtype).T.contiguous().numpy())
        y = self.b.op("MatMul", x, w, name=name)
        if calib is not None:
            self.mark(f"{name}.weight", calib)
        if bias is not None:
            y = self.b.op("Add", y, self.tensor(name + ".bias", bias))
        return y

    def cast(self, x: str, to: int) -> str:
        return self.b.op("Cast", x, to=to)
