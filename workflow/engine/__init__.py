"""Inference engines: ONNX Runtime GenAI (the embedded CPU default) and TensorRT-LLM (GPU clusters)."""
