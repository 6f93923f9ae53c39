"""The engine runtime: load a built engine from its folder, by the backend its manifest names.

    from workflow.engine.runtime import load_engine
    engine = load_engine("results/engine/onnxruntime/int4_awq", EngineConfig())

What serves imports this module, the interface and the manifest, and the one backend it loads: nothing of the build
(calibration, ModelOpt, MLflow). A backend is one row of `BACKENDS` and a class implementing
workflow/engine/interface.py `Engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workflow.config import EngineConfig
from workflow.engine.interface import Engine
from workflow.engine.manifest import EngineManifest


def _onnxruntime(engine_dir: Path, settings: EngineConfig) -> Engine:
    from workflow.engine.onnxruntime import OrtEngine

    ort = settings.onnxruntime
    return OrtEngine(engine_dir, ort.execution_provider, ort.max_batch_size)


def _tensorrt_llm(engine_dir: Path, settings: EngineConfig) -> Engine:
    from workflow.engine.tensorrt_llm import TrtllmEngine

    return TrtllmEngine(engine_dir)


def _pytorch(engine_dir: Path, settings: EngineConfig) -> Engine:
    from workflow.engine.pytorch import PytorchEngine

    return PytorchEngine(engine_dir, settings.pytorch.max_batch_size)


BACKENDS: dict[str, Callable[[Path, EngineConfig], Engine]] = {
    "onnxruntime": _onnxruntime,
    "tensorrt_llm": _tensorrt_llm,
    "pytorch": _pytorch,
}
"""Backend (the manifest's target.backend) -> its loader; each imports its backend's library only when called."""


def load_engine(engine_dir: str | Path, settings: EngineConfig) -> Engine:
    """The engine in engine_dir, by the backend its manifest names, refused unless the manifest matches this machine
    (workflow/engine/manifest.py check_target)."""
    engine_dir = Path(engine_dir)
    backend = EngineManifest.read(engine_dir).target.backend
    loader = BACKENDS.get(backend)
    if loader is None:
        raise ValueError(f"{engine_dir}: its manifest names backend {backend!r}; this runtime loads "
                         f"{', '.join(BACKENDS)} (rebuild the engine with engine.backend set to one of them)")
    return loader(engine_dir, settings)
