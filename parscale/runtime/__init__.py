"""Torch-free generation on ONNX Runtime (CPU or CUDA) for parscale exports.

Needs only numpy, onnxruntime (or onnxruntime-gpu) and tokenizers:

    from parscale.runtime import Model
    m = Model.load("export")
    print(m.generate("def f", max_new_tokens=20).text)
    for piece in m.stream("def f", max_new_tokens=20):
        print(piece, end="", flush=True)
"""

from parscale.errors import ParScaleError
from parscale.runtime.api import Model
from parscale.runtime.generate import GenerationOptions, GenerationResult, Timings, TokenEvent
from parscale.runtime.sampling import SamplingConfig

__all__ = ["GenerationOptions", "GenerationResult", "Model", "ParScaleError", "SamplingConfig", "Timings", "TokenEvent"]
