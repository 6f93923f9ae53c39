"""What an engine was built for, recorded beside it, and the refusal to load it anywhere else.

TensorRT-LLM engines fail on another GPU architecture or version, and record their version but not the
GPU's compute capability; ONNX Runtime GenAI models are tied to an execution provider. The manifest holds
all of it, and `check_target` compares it with where the engine is about to run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MANIFEST = "engine_manifest.json"


class EngineMismatch(RuntimeError):
    """An engine asked to run on a target it was not built for."""


@dataclass(frozen=True)
class Target:
    backend: str
    """onnxruntime or tensorrt_llm."""
    backend_version: str
    device: str
    """cpu, cuda, ... (the ONNX Runtime execution provider) or the GPU's name."""
    gpu_arch: str | None = None
    """Compute capability such as sm_90; None on CPU."""
    tp_size: int = 1
    pp_size: int = 1


@dataclass(frozen=True)
class EngineManifest:
    scheme: str
    """The workflow's quantization scheme this engine serves."""
    precision: str
    """What the engine computes in, in the backend's own terms (e.g. int4 MatMulNBits block 32)."""
    target: Target
    source_sha256: str
    """Tree digest of the checkpoint the engine was built from (ONNX Runtime: the fine-tuned model, before any
    calibration was folded in; TensorRT-LLM: the ModelOpt checkpoint)."""
    build: dict
    """Backend-specific build settings (max batch size, sequence lengths, block size, ...)."""
    algorithm: str = ""
    """The quantization actually applied to the weights the engine runs, in words: e.g. "int4 weight-only, AWQ scales
    folded (...), block 32" or "int4 weight-only, round-to-nearest, block 32"."""
    calibration: dict | None = None
    """The calibration folded into the weights before the backend quantized them: method, the quantize stage's
    calibration digest (calib_sha256), the layers folded and skipped (with why); None when none was."""

    def write(self, engine_dir: str | Path) -> None:
        (Path(engine_dir) / MANIFEST).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, engine_dir: str | Path) -> EngineManifest:
        path = Path(engine_dir) / MANIFEST
        if not path.exists():
            raise EngineMismatch(f"{engine_dir} has no {MANIFEST}: not an engine built by this workflow")
        data = json.loads(path.read_text())
        return cls(**{**data, "target": Target(**data["target"])})


def check_target(manifest: EngineManifest, here: Target) -> None:
    """Refuse to load when any recorded property differs from the target, naming both."""
    built = asdict(manifest.target)
    differences = [
        f"{f.name}: built for {built[f.name]!r}, this target has {getattr(here, f.name)!r}"
        for f in fields(Target)
        if built[f.name] != getattr(here, f.name)
    ]
    if differences:
        raise EngineMismatch(
            f"engine for {manifest.scheme} cannot load here: " + "; ".join(differences) + " (rebuild it on this target)"
        )
