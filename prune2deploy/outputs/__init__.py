"""Output writers besides ``model.onnx``: the onnxruntime-genai folder and the transformers checkpoint."""
