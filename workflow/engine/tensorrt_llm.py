"""TensorRT-LLM engines for GPU clusters: a build plan checked here, the build run in NVIDIA's release container.

    snakemake --sdm apptainer results/engine/fp8/engine_manifest.json   (with engine.backend: tensorrt_llm)

Pinned to one TensorRT-LLM release (workflow/engine/release.py), of the last line with the TensorRT engine backend:
`tensorrt_llm._tensorrt_engine.LLM` builds a tp x pp engine from the ModelOpt unified checkpoint and `llm.save` writes it. The forward-looking
alternative needs no engine: `trtllm-serve <checkpoint> --tp_size N --pp_size M` on the PyTorch backend
(`serve_command`). TensorRT-LLM cannot be installed on our machines: the plan and its checks run in the
tests; the build and the streaming engine below are written against the release's documented API and
were not run here.
"""

from __future__ import annotations

import json
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
        s = self.settings
        return {
            "model": self.checkpoint_dir,
            "tensor_parallel_size": s.tp_size,
            "pipeline_parallel_size": s.pp_size,
            # context logits gathered: the engine check measures closeness to the fine-tuned model (workflow/closeness.py)
            "build_config": {"max_batch_size": s.max_batch_size, "max_input_len": s.max_input_len, "max_seq_len": s.max_seq_len,
                             "gather_context_logits": True},
        }

    def serve_command(self, port: int = 8000) -> list[str]:
        """PyTorch-backend serving of the same checkpoint with the same parallelism (no engine build)."""
        s = self.settings
        return ["trtllm-serve", self.checkpoint_dir, "--host", "0.0.0.0", "--port", str(port), "--tp_size", str(s.tp_size),
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


def build(build_plan: BuildPlan, source_sha256: str) -> EngineManifest:
    """Build and save the engine (inside the release container, on tp x pp GPUs). Not run on our machines."""
    _tensorrt_llm()
    import torch
    from tensorrt_llm import BuildConfig
    from tensorrt_llm._tensorrt_engine import LLM

    if torch.cuda.get_device_capability() < (needed := SCHEMES[build_plan.scheme].tensorrt_llm_min_compute):
        raise ValueError(f"build_engine: {build_plan.scheme} needs compute capability {needed} or newer")
    arguments = build_plan.llm_arguments()
    arguments["build_config"] = BuildConfig(**arguments["build_config"])
    llm = LLM(**arguments)
    llm.save(build_plan.engine_dir)
    keep_generation_config(build_plan.checkpoint_dir, build_plan.engine_dir)
    here = target(build_plan.settings.tp_size, build_plan.settings.pp_size)
    manifest = EngineManifest(build_plan.scheme, build_plan.quant_algo or BASELINE, here, source_sha256,
                              {"release": TENSORRT_LLM, **build_plan.settings.model_dump()},
                              algorithm=f"ModelOpt {build_plan.quant_algo}, calibrated by the quantize stage"
                              if build_plan.quant_algo else "none: unquantized weights")
    manifest.write(build_plan.engine_dir)
    return manifest


class TrtllmEngine:
    """A saved engine, loaded only on the GPU architecture, version and tp x pp it was built for
    (workflow.engine.runtime.Engine). Its executor batches in flight requests itself, up to the build's max_batch_size."""

    def __init__(self, engine_dir: str | Path) -> None:
        self.manifest = EngineManifest.read(engine_dir)
        check_target(self.manifest, target(self.manifest.target.tp_size, self.manifest.target.pp_size))
        self.max_batch_size = int(self.manifest.build.get("max_batch_size", 1))
        from tensorrt_llm._tensorrt_engine import LLM

        self.llm = LLM(model=str(engine_dir))

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
        build gathers context logits). Written against TensorRT-LLM's LLM API; not run on our machines."""
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
