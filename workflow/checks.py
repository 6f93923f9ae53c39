"""Cross-stage checks: settings of one stage that another stage cannot honour, found before any job runs.

    snakemake -n            (the plan runs when the workflow is parsed: a config that cannot run stops here)

Each problem names both keys, the figures, and a change that fixes that figure. Schemes the model's shapes cannot
take are not problems: they are dropped with their reason (or take a block size that divides the shapes), and the
other schemes go on. Lengths are checked against their bounds: an evaluation or canary prompt is at most
data.max_seq_len tokens (longer rows are dropped when the data is prepared).
"""

from __future__ import annotations

import importlib.util

from workflow.capacity import Architecture
from workflow.config import Config
from workflow.schemes import BASELINE, SCHEMES


def engine_context(cfg: Config, arch: Architecture) -> tuple[int | None, int | None, str, str | None]:
    """(longest prompt, longest prompt + output, what sets it, the key that raises it) of the configured engine."""
    if cfg.engine.backend == "tensorrt_llm":
        trt = cfg.engine.tensorrt_llm
        return trt.max_input_len, trt.max_seq_len, "engine.tensorrt_llm.max_seq_len", "engine.tensorrt_llm.max_seq_len"
    # ONNX Runtime GenAI builds its context length from the model's max_position_embeddings.
    raise_key = "bootstrap.max_position_embeddings" if cfg.base_model == "bootstrap" else None
    return None, arch.max_positions, "the model's max_position_embeddings", raise_key


def shorter(context: int, prompt: int, output: int, raise_key: str | None, need: int) -> str:
    """The changes that make a prompt bound plus an output length fit a context."""
    fixes = [f"lower evaluate.max_new_tokens to {context - prompt}"] if context - prompt >= 1 else []
    fixes += [f"lower data.max_seq_len to {context - output}"] if context - output >= 16 else []
    fixes += [f"raise {raise_key} to {need}"] if raise_key else []
    return ", or ".join(fixes)


def length_problems(cfg: Config, arch: Architecture) -> list[str]:
    """Generation and prompt lengths of evaluation, benchmark and canary vs the gateway, the engine and the model."""
    limits, evaluation, load, data = cfg.rollout.gateway.limits, cfg.evaluate, cfg.benchmark, cfg.data
    problems = []
    if evaluation.max_new_tokens > limits.max_tokens:
        problems.append(f"evaluate.max_new_tokens {evaluation.max_new_tokens} > rollout.gateway.limits.max_tokens {limits.max_tokens}: "
                        f"the canary asks the gateway for the evaluated length and gets a 400; set rollout.gateway.limits.max_tokens: "
                        f"{evaluation.max_new_tokens} (or lower evaluate.max_new_tokens)")
    if load.output_len > limits.max_tokens:
        problems.append(f"benchmark.output_len {load.output_len} > rollout.gateway.limits.max_tokens {limits.max_tokens}: the canary's "
                        f"latency check asks for the benchmark's output length; set rollout.gateway.limits.max_tokens: {load.output_len} "
                        "(or lower benchmark.output_len)")
    if data.max_seq_len > limits.max_prompt_tokens:
        problems.append(f"data.max_seq_len {data.max_seq_len} > rollout.gateway.limits.max_prompt_tokens {limits.max_prompt_tokens}: the "
                        f"canary sends held-out prompts of up to data.max_seq_len tokens; set rollout.gateway.limits.max_prompt_tokens: "
                        f"{data.max_seq_len} (or lower data.max_seq_len)")
    if arch.max_positions and data.max_seq_len > arch.max_positions:
        problems.append(f"data.max_seq_len {data.max_seq_len} > the model's max_position_embeddings {arch.max_positions}: training rows "
                        f"longer than the model's positions; set data.max_seq_len: {arch.max_positions}")
    max_input, context, context_key, raise_key = engine_context(cfg, arch)
    if context:
        need = data.max_seq_len + evaluation.max_new_tokens
        if need > context:
            problems.append(f"data.max_seq_len {data.max_seq_len} + evaluate.max_new_tokens {evaluation.max_new_tokens} = {need} > "
                            f"{context_key} {context}: evaluation prompts plus their answers do not fit the engine; "
                            + shorter(context, data.max_seq_len, evaluation.max_new_tokens, raise_key, need))
        if load.input_len + load.output_len > context:
            total = load.input_len + load.output_len
            problems.append(f"benchmark.input_len {load.input_len} + benchmark.output_len {load.output_len} = {total}"
                            f" > {context_key} {context}: the benchmark's requests do not fit the engine; lower benchmark.input_len to "
                            f"{max(1, context - load.output_len)}")
    if max_input:
        for key, value in (("benchmark.input_len", load.input_len), ("data.max_seq_len", data.max_seq_len)):
            if value > max_input:
                problems.append(f"{key} {value} > engine.tensorrt_llm.max_input_len {max_input}: longer prompts than the engine takes; "
                                f"set engine.tensorrt_llm.max_input_len: {value} (below max_seq_len)")
    if cfg.engine.backend == "tensorrt_llm" and arch.max_positions and cfg.engine.tensorrt_llm.max_seq_len > arch.max_positions:
        problems.append(f"engine.tensorrt_llm.max_seq_len {cfg.engine.tensorrt_llm.max_seq_len} > the model's max_position_embeddings "
                        f"{arch.max_positions}; set engine.tensorrt_llm.max_seq_len: {arch.max_positions}")
    return problems


def scheme_blocks(cfg: Config, arch: Architecture) -> dict[str, dict]:
    """Per configured scheme: the block size its kernels take on this model, or why the model cannot take it."""
    features = {"hidden_size": arch.hidden_size, "num_heads x head_dim": arch.q_dim, "intermediate_size": arch.intermediate_size}
    out = {}
    for name in cfg.quantize.schemes:
        scheme = SCHEMES[name]
        block = scheme.block_for(list(features.values()))
        if block is not None:
            out[name] = {"block": block}
            continue
        sizes = " or ".join(map(str, (scheme.block, *scheme.fallback_blocks)))
        bad = ", ".join(f"{k} {n}" for k, n in features.items() if n % scheme.block)
        out[name] = {"dropped": f"{name} needs every linear layer's in-features divisible by {sizes} (this model: {bad})"}
    return out


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def feature_problems(cfg: Config) -> list[str]:
    """Requested features the hardware or the installed packages cannot give."""
    ft, gpus = cfg.finetune, cfg.cluster.gpus_per_node
    problems = []
    if gpus and ft.liger_kernel and not installed("liger_kernel"):
        problems.append(f"finetune.liger_kernel true with cluster.gpus_per_node {gpus}, but liger-kernel is not "
                        "installed: install the GPU set-up (README.md: .venv/bin/pip install -r requirements-gpu.txt), or set finetune.liger_kernel: false")
    if not gpus and ft.attention == "varlen":
        problems.append("finetune.attention varlen needs a CUDA GPU, but cluster.gpus_per_node is 0: set finetune.attention: auto")
    if not gpus and cfg.engine.backend == "onnxruntime" and cfg.engine.onnxruntime.execution_provider == "cuda":
        problems.append("engine.onnxruntime.execution_provider cuda needs GPUs, but cluster.gpus_per_node is 0: "
                        "set engine.onnxruntime.execution_provider: cpu")
    if cfg.engine.backend == "pytorch" and not any(SCHEMES[s].baseline for s in cfg.quantize.schemes):
        problems.append(f"engine.backend pytorch serves the unquantized baseline only, but quantize.schemes "
                        f"{list(cfg.quantize.schemes)} leaves it out: add {BASELINE} to quantize.schemes, or engine.backend: tensorrt_llm")
    return problems
