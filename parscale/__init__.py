"""parscale: export ParScale language models to ONNX and run them on small devices."""

from parscale.errors import ParScaleError

__version__ = "0.1.0"

__all__ = ["ParScaleError", "__version__"]
