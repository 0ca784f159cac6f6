"""The PyTorch ParScale model and its checkpoints: the layer below exporter/, train/ and evaluation."""
