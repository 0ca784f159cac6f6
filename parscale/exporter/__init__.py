"""Checkpoint to ONNX: the fused graph written from the PyTorch module, quantization and the export folder."""
