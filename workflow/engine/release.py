"""The TensorRT-LLM release the engine code is written against, declared once: the rules' `container:`, the Kubernetes
engine image's default, the engine manifest (workflow/engine/tensorrt_llm.py: its LLM API on the PyTorch backend)."""

TENSORRT_LLM = "1.2.1"
TENSORRT_LLM_IMAGE = f"nvcr.io/nvidia/tensorrt-llm/release:{TENSORRT_LLM}"
