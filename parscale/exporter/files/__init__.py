"""The files of an export beside model.onnx: copied sources, genai configs, transformers.js, ORT Mobile, the card."""
