"""The TensorRT-LLM release the engine code is written against, declared once: the rules' `container:`, the Kubernetes
engine image's default, the engine manifest. 1.2.x is the last line with the TensorRT engine backend
(workflow/engine/tensorrt_llm.py)."""

TENSORRT_LLM = "1.2.1"
TENSORRT_LLM_IMAGE = f"nvcr.io/nvidia/tensorrt-llm/release:{TENSORRT_LLM}"
