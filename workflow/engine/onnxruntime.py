"""ONNX Runtime GenAI engines: built with its model builder, run in-process with streaming generation.

The build is the builder's command line, called in this process (its own parsing, then create_model):

    python -m onnxruntime_genai.models.builder -i results/model -o ENGINE -p int4 -e cpu
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from workflow.engine.batching import ContinuousBatcher
from workflow.engine.manifest import EngineManifest, Target, check_target
from workflow.engine.interface import GenerationRequest
from workflow.engine.sampling import keep_generation_config
from workflow.schemes import SCHEMES

if TYPE_CHECKING:  # the build's calibration (torch, transformers) stays out of what serves
    from workflow.engine.calibration import FoldReport

# The builder precision of each scheme is its row's `onnxruntime` (workflow/schemes.py); FP8 has no ONNX Runtime GenAI
# kernels: it needs TensorRT-LLM on an FP8-capable GPU. The builder quantizes the weights it is given (MatMulNBits,
# block-wise); the quantize stage's AWQ/SmoothQuant scales reach it folded into those weights
# (workflow/engine/calibration.py). Activations stay in floating point (accuracy_level 4 quantizes them to int8 per
# block inside the MatMul), so int8_sq and int4_awq engines are weight-only here.


def precision_for(scheme: str, provider: str) -> str:
    """The builder's precision for the scheme on the provider (the config already checked both names)."""
    precision = SCHEMES[scheme].onnxruntime.get(provider)
    if precision is None:
        supported = [name for name, s in SCHEMES.items() if provider in s.onnxruntime]
        raise ValueError(
            f"build_engine: scheme {scheme} has no ONNX Runtime GenAI engine on {provider} "
            f"(supported: {', '.join(supported)}); use engine.backend: tensorrt_llm for {scheme}, or drop it from quantize.schemes"
        )
    return precision


def target(provider: str) -> Target:
    return Target(backend="onnxruntime", backend_version=version("onnxruntime-genai"), device=provider)


def algorithm(precision: str, block_size: int, calibration: FoldReport | None) -> str:
    """What the engine's weights really are, in words (the manifest's and the selection table's)."""
    if precision not in ("int4", "int8"):
        return "none: unquantized weights"
    if calibration is None:
        return f"{precision} weight-only, round-to-nearest, block {block_size}"
    total = len(calibration.folded) + len(calibration.skipped)
    return (f"{precision} weight-only, {calibration.calibration} scales folded ({len(calibration.folded)} of {total} layers; "
            f"the rest round-to-nearest), block {block_size}")


def build(model_dir: str | Path, engine_dir: str | Path, scheme: str, provider: str, block_size: int, accuracy_level: int,
          source_sha256: str, log_path: str | Path | None = None, calibration: FoldReport | None = None) -> EngineManifest:
    """Build with the ONNX Runtime GenAI model builder from model_dir: the fine-tuned model, or (with `calibration`)
    the fine-tuned model with the quantize stage's scales folded in (workflow/engine/calibration.py)."""
    precision = precision_for(scheme, provider)
    build_options = {"builder_precision": precision}
    extra = []
    if precision in ("int4", "int8"):
        extra = [f"block_size={block_size}", f"accuracy_level={accuracy_level}"]
        build_options |= {"block_size": block_size, "accuracy_level": accuracy_level}
    run_builder(model_dir, engine_dir, precision, provider, extra, log_path)
    described = f"{precision} weights" + (f" (MatMulNBits, block {block_size})" if precision in ("int4", "int8") else "")
    manifest = EngineManifest(scheme=scheme, precision=described, target=target(provider), source_sha256=source_sha256,
                              build=build_options, algorithm=algorithm(precision, block_size, calibration),
                              calibration=calibration.as_dict() if calibration else None)
    keep_generation_config(model_dir, engine_dir)
    manifest.write(engine_dir)
    return manifest


def run_builder(model_dir: str | Path, engine_dir: str | Path, precision: str, provider: str, extra: list[str],
                log_path: str | Path | None) -> None:
    """The model builder's `-i model_dir -o engine_dir -p precision -e provider --extra_options *extra`, in this
    process (a subprocess would import torch and Transformers again: 4-5 s a build on 2 cores); what it prints goes
    to log_path."""
    from onnxruntime_genai.models import builder

    args = (None, str(model_dir), str(engine_dir), precision, provider, str(Path(engine_dir).parent / ".builder_cache"))
    with open(log_path or os.devnull, "a") as sink, redirect_stdout(sink), redirect_stderr(sink):
        try:
            builder.create_model(*args, **builder.parse_extra_options(*args, extra or None))
        except Exception as err:
            traceback.print_exc(file=sink)
            first = next(iter(str(err).strip().splitlines()), "")
            raise RuntimeError(f"build_engine: the ONNX Runtime GenAI builder failed ({type(err).__name__}: {first}); see {log_path}") from err


class OrtEngine:
    """A built engine, loaded only where its manifest matches; generates greedily, streaming token ids
    (workflow.engine.runtime.Engine).

    On CPU, concurrent `stream` calls are batched continuously (workflow/engine/batching.py); elsewhere each request
    runs its own og.Generator."""

    def __init__(self, engine_dir: str | Path, provider: str = "cpu", max_batch_size: int = 8) -> None:
        self.manifest = EngineManifest.read(engine_dir)
        check_target(self.manifest, target(provider))
        self.engine_dir, self.max_batch_size = Path(engine_dir), max_batch_size if provider == "cpu" else 1
        self.batcher = ContinuousBatcher(engine_dir, max_batch_size) if provider == "cpu" else None
        self.model = None if provider == "cpu" else self._load_model()
        self.vocab_size = json.loads((Path(engine_dir) / "genai_config.json").read_text())["model"]["vocab_size"]

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "batcher", None) is not None:
            self.batcher.close()

    def _load_model(self):
        import onnxruntime_genai as og

        return og.Model(str(self.engine_dir))

    def stream(self, request: GenerationRequest) -> Iterator[int]:
        if self.batcher is not None:
            return self.batcher.stream(request)
        return self.stream_alone(request)

    def stream_alone(self, request: GenerationRequest) -> Iterator[int]:
        """One request in its own og.Generator: onnxruntime-genai's own loop, the reference for batched outputs. Its
        search options have temperature, top-k, top-p, a seed and the repetition penalty, but no logit bias and no
        presence or frequency penalty: those are refused (ValueError) rather than dropped."""
        import onnxruntime_genai as og

        sampling = request.sampling
        if sampling.logit_bias or sampling.presence_penalty or sampling.frequency_penalty:
            raise ValueError("generate: logit_bias, presence_penalty and frequency_penalty need the CPU engine's batching "
                             "loop; onnxruntime-genai's own generator (used on GPUs) has no such option")
        self.model = self.model or self._load_model()
        params = og.GeneratorParams(self.model)
        prompt = len(request.prompt_ids)
        options = {"max_length": prompt + request.max_new_tokens, "min_length": prompt + request.min_new_tokens,
                   "do_sample": not sampling.greedy, "repetition_penalty": sampling.repetition_penalty}
        if not sampling.greedy:
            options |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or self.vocab_size}
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed % 2**31
        params.set_search_options(**options)
        return self._generated(og.Generator(self.model, params), request)

    @staticmethod
    def _generated(generator, request: GenerationRequest) -> Iterator[int]:
        generator.append_tokens(list(request.prompt_ids))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])
