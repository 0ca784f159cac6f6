"""Checkpoint to ONNX: the PyTorch module, tracing, quantization and the export folder."""
