"""TensorRT-LLM for GPU clusters: its LLM API on its default PyTorch backend, serving the quantize stage's ModelOpt
checkpoint itself (no engine to compile), split tp x pp.

    snakemake --sdm apptainer results/engine/tensorrt_llm/fp8    (with engine.backend: tensorrt_llm)

Pinned to one TensorRT-LLM release (workflow/engine/release.py). The build stage checks the split against the
checkpoint (`plan`), copies the checkpoint into the engine folder with the LLM arguments it is served with
(`llm_args.json`) and the manifest, and the engine check loads it with `tensorrt_llm.LLM(**arguments)` on tp x pp
GPUs. `trtllm-serve <engine folder>` serves the same folder with the same parallelism (`serve_command`; the gateway's
upstream mode forwards to it). TensorRT-LLM cannot be installed on our machines: the plan, its refusals and the folder
it writes run in the tests; loading and streaming are written against the release's documented LLM API and were not
run here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workflow.config import TrtllmSettings
from workflow.engine.manifest import EngineManifest, Target, check_target
from workflow.engine.interface import GenerationRequest
from workflow.engine.release import TENSORRT_LLM, TENSORRT_LLM_IMAGE
from workflow.engine.sampling import keep_generation_config
from workflow.schemes import BASELINE, SCHEMES



class TrtllmMissing(RuntimeError):
    """TensorRT-LLM is not importable where the build or the engine was asked to run."""


@dataclass(frozen=True)
class BuildPlan:
    scheme: str
    quant_algo: str | None
    checkpoint_dir: str
    engine_dir: str
    settings: TrtllmSettings

    @property
    def world_size(self) -> int:
        """GPUs the engine spans (and the rule's gpu resource): tp x pp."""
        return self.settings.tp_size * self.settings.pp_size

    def llm_arguments(self) -> dict:
        """`tensorrt_llm.LLM`'s arguments (PyTorch backend, its default) for the engine folder, without the model path."""
        s = self.settings
        return {"tensor_parallel_size": s.tp_size, "pipeline_parallel_size": s.pp_size, "max_batch_size": s.max_batch_size,
                "max_input_len": s.max_input_len, "max_seq_len": s.max_seq_len}

    def serve_command(self, port: int = 8000) -> list[str]:
        """trtllm-serve (PyTorch backend) on the engine folder, with the same parallelism and limits."""
        s = self.settings
        return ["trtllm-serve", self.engine_dir, "--host", "0.0.0.0", "--port", str(port), "--tp_size", str(s.tp_size),
                "--pp_size", str(s.pp_size), "--max_batch_size", str(s.max_batch_size), "--max_seq_len", str(s.max_seq_len)]


def plan(checkpoint_dir: str | Path, engine_dir: str | Path, scheme: str, settings: TrtllmSettings) -> BuildPlan:
    """Check that the checkpoint can be split tp x pp and fits the sequence settings, before any GPU is asked for."""
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    layers, tp, pp = config["num_hidden_layers"], settings.tp_size, settings.pp_size
    problems = []
    if heads % tp:
        problems.append(f"tp_size {tp} must divide num_attention_heads {heads}")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"tp_size {tp} and num_key_value_heads {kv_heads} must divide one another")
    if pp > layers:
        problems.append(f"pp_size {pp} exceeds num_hidden_layers {layers}")
    if settings.max_input_len >= settings.max_seq_len:
        problems.append(f"max_input_len {settings.max_input_len} must be below max_seq_len {settings.max_seq_len}")
    recipe = checkpoint_dir / "hf_quant_config.json"
    quant_algo = json.loads(recipe.read_text())["quantization"]["quant_algo"] if recipe.exists() else None
    if quant_algo != SCHEMES[scheme].quant_algo:
        problems.append(f"the checkpoint's quant_algo is {quant_algo}, but {scheme} is {SCHEMES[scheme].quant_algo} (workflow/schemes.py)")
    if problems:
        raise ValueError("build_engine (tensorrt_llm): " + "; ".join(problems) + " (engine.tensorrt_llm)")
    return BuildPlan(scheme, quant_algo, str(checkpoint_dir), str(engine_dir), settings)


def _tensorrt_llm():
    try:
        import tensorrt_llm
    except ImportError as err:
        raise TrtllmMissing(
            f"engine.backend tensorrt_llm needs TensorRT-LLM {TENSORRT_LLM}, which is not importable here ({err}). "
            f"Run the workflow with `--sdm apptainer` so the rule uses {TENSORRT_LLM_IMAGE}, or install tensorrt-llm=={TENSORRT_LLM} on a GPU host."
        ) from None
    return tensorrt_llm


def target(tp_size: int, pp_size: int) -> Target:
    trtllm = _tensorrt_llm()
    import torch

    major, minor = torch.cuda.get_device_capability()
    return Target(backend="tensorrt_llm", backend_version=trtllm.__version__, device=torch.cuda.get_device_name(),
                  gpu_arch=f"sm_{major}{minor}", tp_size=tp_size, pp_size=pp_size)


LLM_ARGS = "llm_args.json"
"""The engine folder's `tensorrt_llm.LLM` arguments (BuildPlan.llm_arguments)."""


def build(build_plan: BuildPlan, source_sha256: str) -> EngineManifest:
    """The engine folder (inside the release container, on tp x pp GPUs): the checkpoint's files, the LLM arguments
    and the manifest. The PyTorch backend compiles nothing ahead: the engine check's first load is the proof."""
    _tensorrt_llm()
    import torch

    if torch.cuda.get_device_capability() < (needed := SCHEMES[build_plan.scheme].tensorrt_llm_min_compute):
        raise ValueError(f"build_engine: {build_plan.scheme} needs compute capability {needed} or newer")
    engine_dir = Path(build_plan.engine_dir)
    shutil.copytree(build_plan.checkpoint_dir, engine_dir, dirs_exist_ok=True)
    (engine_dir / LLM_ARGS).write_text(json.dumps(build_plan.llm_arguments(), indent=1))
    keep_generation_config(build_plan.checkpoint_dir, engine_dir)
    here = target(build_plan.settings.tp_size, build_plan.settings.pp_size)
    manifest = EngineManifest(build_plan.scheme, build_plan.quant_algo or BASELINE, here, source_sha256,
                              {"release": TENSORRT_LLM, "backend": "pytorch", **build_plan.settings.model_dump()},
                              algorithm=f"ModelOpt {build_plan.quant_algo}, calibrated by the quantize stage"
                              if build_plan.quant_algo else "none: unquantized weights")
    manifest.write(engine_dir)
    return manifest


class TrtllmEngine:
    """A saved engine, loaded only on the GPU architecture, version and tp x pp it was built for
    (workflow.engine.runtime.Engine). Its executor batches in flight requests itself, up to the build's max_batch_size."""

    def __init__(self, engine_dir: str | Path) -> None:
        self.manifest = EngineManifest.read(engine_dir)
        check_target(self.manifest, target(self.manifest.target.tp_size, self.manifest.target.pp_size))
        self.max_batch_size = int(self.manifest.build.get("max_batch_size", 1))
        from tensorrt_llm import LLM

        self.llm = LLM(model=str(engine_dir), **json.loads((Path(engine_dir) / LLM_ARGS).read_text()))

    def stream(self, request: GenerationRequest) -> Iterator[int]:
        """Tokens as TensorRT-LLM generates them, sampled by its own sampler with the request's fields (its
        SamplingParams: temperature 0 is greedy, top_k 0 keeps all); a logit bias is refused (ValueError), not dropped."""
        from tensorrt_llm import SamplingParams as TrtllmSampling

        sampling = request.sampling
        if sampling.logit_bias:
            raise ValueError("generate: logit_bias is not passed to TensorRT-LLM engines by this gateway; leave it out")
        fields = {"max_tokens": request.max_new_tokens, "min_tokens": request.min_new_tokens, "temperature": sampling.temperature,
                  "repetition_penalty": sampling.repetition_penalty, "presence_penalty": sampling.presence_penalty,
                  "frequency_penalty": sampling.frequency_penalty}
        if not sampling.greedy:
            fields |= {"top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed}
        return self._generated(list(request.prompt_ids), TrtllmSampling(**fields))

    def context_logits(self, ids: list[int]):
        """The logits at every position of ids, (len(ids), vocab): teacher-forced, for workflow/closeness.py (the
        PyTorch backend returns them when the request asks). Written against TensorRT-LLM's LLM API; not run here."""
        from tensorrt_llm import SamplingParams as TrtllmSampling

        output = self.llm.generate(ids, TrtllmSampling(max_tokens=1, return_context_logits=True))
        return output.context_logits.float().cpu()

    def _generated(self, prompt_ids: list[int], sampling) -> Iterator[int]:
        seen = 0
        for output in self.llm.generate_async(prompt_ids, sampling, streaming=True):
            tokens = output.outputs[0].token_ids
            yield from tokens[seen:]
            seen = len(tokens)

    def close(self) -> None:
        self.llm.shutdown()
