"""The fused decoder graph: the streaming ONNX builder, the decoder layer by layer, attention and the P streams."""
