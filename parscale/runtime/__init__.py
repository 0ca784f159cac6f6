"""Torch-free generation on ONNX Runtime (CPU or CUDA) for parscale exports.

Needs only numpy, onnxruntime (or onnxruntime-gpu) and tokenizers:

    from parscale.runtime import Model
    m = Model.load("export")
    print(m.generate("def f", max_new_tokens=20).text)
"""

from parscale.errors import ParScaleError
from parscale.runtime.generate import GenerationResult, Timings
from parscale.runtime.model import Model
from parscale.runtime.sampling import SamplingConfig

__all__ = ["GenerationResult", "Model", "ParScaleError", "SamplingConfig", "Timings"]
