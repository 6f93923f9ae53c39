"""plan: does this config fit its machines? Memory per device for training and serving, before any job queues.

    snakemake results/plan/plan.json        (runs first, on the submit host, in seconds; every stage waits for it)

From the base model's config.json (or the bootstrap settings) and the workflow config, it computes:
- training, per process (one per GPU, or per CPU rank on a CPU machine): DeepSpeed's model states for the ZeRO
  stage and offload settings, the gathered layer of ZeRO-3, and activations for the micro-batch and sequence
  length with and without gradient checkpointing;
- serving, per GPU, for every quantization scheme: weights at the scheme's precision and the KV cache for
  max_batch x max_seq_len, split over tp x pp;
and compares them with the declared `cluster:`. When something does not fit it fails with the numbers and the
smallest change that fits. Figures are estimates of what stays resident; `cluster.overhead_gib` covers the CUDA
context, communication buffers and allocator fragmentation.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

from workflow.capacity import (
    Architecture,
    PlanError,
    Serving,
    Training,
    model_architecture,
    serving_memory,
    serving_suggestion,
    training_memory,
    training_suggestion,
)
from workflow.checks import feature_problems, length_problems, scheme_blocks
from workflow.config import Config
from workflow.schemes import BASELINE, SCHEMES, buildable

ANY_SHAPE = [name for name, scheme in SCHEMES.items() if scheme.block == 1]
"""Schemes every model's shapes take."""


def plan_for(arch: Architecture, config: Config) -> dict:
    """The plan for the whole typed config: memory per device, cross-stage lengths, schemes, installed features."""
    cluster, ft = config.cluster, config.finetune
    liger = ft.liger_kernel and cluster.gpus_per_node > 0
    training = Training.of(ft, config.data.max_seq_len, ft.nproc_per_node, cluster.nodes, liger_kernel=liger)
    problems = []
    if cluster.gpus_per_node and ft.nproc_per_node > cluster.gpus_per_node:
        problems.append(f"finetune.nproc_per_node {ft.nproc_per_node} > cluster.gpus_per_node {cluster.gpus_per_node}: one process per GPU")
    train = training_memory(arch, training, cluster)
    train["alternatives"] = [
        {"zero_stage": s, "offload": o, "gradient_checkpointing": gc, "device_or_host_gib": m["device_gib"] or m["host_per_node_gib"], "fits": m["fits"]}
        for s, o, gc in itertools.product(range(4), ("none", "optimizer", "optimizer+params"), (False, True))
        if (t := replace(training, zero_stage=s, offload_optimizer=o != "none", offload_params=o == "optimizer+params", gradient_checkpointing=gc)).valid()
        for m in [training_memory(arch, t, cluster)]
    ]
    if not train["fits"]:
        train["suggestion"] = training_suggestion(arch, training, cluster)
        problems.append(training_problem(train))

    schemes = scheme_blocks(config, arch)
    kept = [name for name, s in schemes.items() if "dropped" not in s]
    if not kept:
        problems.append(f"quantize.schemes {list(config.quantize.schemes)}: the model's shapes take none of them "
                        f"({'; '.join(s['dropped'] for s in schemes.values())}); add {' or '.join(ANY_SHAPE)}, which take any shape")
    serving = {}
    base = serving_setup(config)
    no_gpus = config.engine.backend == "tensorrt_llm" and not cluster.gpus_per_node
    if no_gpus:  # then per-GPU memory means nothing: this is the one problem to name
        problems.append("engine.backend tensorrt_llm needs GPUs, but cluster.gpus_per_node is 0: set cluster.gpus_per_node, "
                        "or engine.backend: onnxruntime")
    served = [s for s in kept if buildable(s, config.engine.backend, config.engine.onnxruntime.execution_provider)]
    for scheme in [] if no_gpus else served:
        s = replace(base, scheme=scheme)
        serving[scheme] = serving_memory(arch, s, cluster)
        if not serving[scheme]["fits"]:
            serving[scheme]["suggestion"] = serving_suggestion(arch, s, cluster)
            problems.append(serving_problem(scheme, serving[scheme]))
    problems += length_problems(config, arch) + feature_problems(config)
    p = arch.params()
    return {
        "model": asdict(arch) | {"params": p["total"], "params_billion": round(p["total"] / 1e9, 3),
                                 "weights_bf16_gb": round(2 * p["total"] / 1e9, 4)},
        "cluster": cluster.model_dump(),
        "resolved": {"finetune": ft.model_dump(mode="json"), "max_seq_len": config.data.max_seq_len,
                     "liger_kernel_counted": liger},
        "training": train,
        "schemes": schemes,
        "serving": serving,
        "fits": not problems,
        "problems": problems,
    }


def serving_setup(config: Config) -> Serving:
    """What the configured engine holds per device: TensorRT-LLM's build limits, or the benchmark's load on ONNX Runtime."""
    if config.engine.backend == "tensorrt_llm":
        trt = config.engine.tensorrt_llm
        return Serving(BASELINE, trt.tp_size, trt.pp_size, trt.max_batch_size, trt.max_seq_len, on_gpu=True)
    bench = config.benchmark
    gpu_engine = config.engine.backend == "pytorch" or config.engine.onnxruntime.execution_provider == "cuda"
    on_gpu = gpu_engine and config.cluster.gpus_per_node > 0
    return Serving(BASELINE, 1, 1, max(bench.concurrency), bench.input_len + bench.output_len, on_gpu=on_gpu, fp32_baseline=not on_gpu)


def _changes(suggestion: dict | None, otherwise: str) -> str:
    if not suggestion:
        return otherwise
    return ", ".join(f"{k}: {json.dumps(v)}" for k, v in suggestion["changes"].items())


def training_problem(train: dict) -> str:
    t = train["setup"]
    where = (f"{_g(train['device_gib'])} GiB per GPU > cluster.gpu_memory_gib {train['device_limit_gib']:g}"
             if train["device_gib"] is not None and train["device_gib"] > train["device_limit_gib"]
             else f"{_g(train['host_per_node_gib'])} GiB of host memory per node > cluster.host_memory_gib {train['host_limit_gib']:g}")
    layers = f"{t['checkpointed_layers']} of {t['num_layers']} layers checkpointed"
    text = (f"training does not fit: {where} (ZeRO-{t['zero_stage']}, {t['ranks']} ranks, micro-batch {t['micro_batch_size']} x "
            f"{t['seq_len']} tokens, {layers}; {', '.join(f'{k} {_g(v)}' for k, v in train['per_process_gib'].items() if v)} GiB per process)")
    s = train.get("suggestion")
    fit = s and (s["memory"]["device_gib"] or s["memory"]["host_per_node_gib"])
    otherwise = "nothing tried fits (up to 64x the nodes): use a smaller model, or finetune.method: lora"
    return text + f"; smallest change that fits: {_changes(s, otherwise)}" + (f" ({_g(fit)} GiB)" if s else "")


def serving_problem(scheme: str, serve: dict) -> str:
    s = serve["setup"]
    if s["on_gpu"] and s["tp"] * s["pp"] > serve["gpus"] and serve["device_gib"] <= serve["device_limit_gib"]:
        return (f"serving {scheme} at tp {s['tp']} x pp {s['pp']} needs {s['tp'] * s['pp']} GPUs, but cluster.gpus_per_node x "
                f"cluster.nodes is {serve['gpus']}: set cluster.gpus_per_node/nodes, or smaller engine.tensorrt_llm.tp_size/pp_size")
    text = (f"serving {scheme} does not fit: {_g(serve['device_gib'])} GiB per device > {serve['device_limit_gib']:g} GiB at tp {s['tp']} x pp {s['pp']}, "
            f"batch {s['max_batch']} x {s['max_seq_len']} tokens (weights {_g(serve['per_device_gib']['weights'])} GiB, KV cache "
            f"{_g(serve['per_device_gib']['kv_cache'])} GiB)")
    sug = serve.get("suggestion")
    otherwise = ("no tp x pp up to 16 x 16 fits: more memory per GPU (cluster.gpu_memory_gib), a scheme with smaller weights "
                 "(quantize.schemes), or a smaller engine.tensorrt_llm.max_batch_size x max_seq_len")
    return text + f"; smallest change that fits: {_changes(sug, otherwise)}" + (f" ({_g(sug['memory']['device_gib'])} GiB per device)" if sug else "")


def _g(gib: float | None) -> str:
    return "-" if gib is None else f"{gib:.3g}"


def markdown(result: dict, source: str) -> str:
    m, c, t = result["model"], result["cluster"], result["training"]
    device = f"{c['gpus_per_node']} x {c['gpu_memory_gib']} GiB GPUs per node" if c["gpus_per_node"] else "no GPUs (CPU ranks in host memory)"
    lines = [
        f"# Plan: {'fits' if result['fits'] else 'DOES NOT FIT'}", "",
        f"Model ({source}): {m['params']:,} parameters ({m['params_billion']} B), {m['weights_bf16_gb']:.4g} GB of bf16 weights. "
        f"Cluster: {c['nodes']} node(s), {device}, {c['host_memory_gib']} GiB host memory per node, {c['overhead_gib']} GiB overhead per process.", "",
        "## Training, per process", "",
        "| part | GiB |", "| --- | --- |", *[f"| {k} | {_g(v)} |" for k, v in t["per_process_gib"].items()],
        f"| **total per GPU** | **{_g(t['device_gib'])}** (limit {t['device_limit_gib']:g}) |" if t["device_gib"] is not None else "| **total per GPU** | no GPUs |",
        f"| host per node | {_g(t['host_per_node_gib'])} (limit {t['host_limit_gib']:g}) |", "",
        "### ZeRO stages and offload (same micro-batch)", "",
        "| ZeRO | offload | grad. checkpointing | GiB per GPU (host per node without GPUs) | fits |", "| --- | --- | --- | --- | --- |",
        *[f"| {a['zero_stage']} | {a['offload']} | {a['gradient_checkpointing']} | {_g(a['device_or_host_gib'])} | {a['fits']} |" for a in t["alternatives"]], "",
        "## Serving, per device", "",
        "| scheme | tp x pp | batch x seq | weights total GiB | weights per device | KV cache per device | total per device | limit | fits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {k} | {s['setup']['tp']} x {s['setup']['pp']} | {s['setup']['max_batch']} x {s['setup']['max_seq_len']} | {_g(s['weights_total_gib'])} | "
          f"{_g(s['per_device_gib']['weights'])} | {_g(s['per_device_gib']['kv_cache'])} | {_g(s['device_gib'])} | {s['device_limit_gib']:g} | {s['fits']} |"
          for k, s in result["serving"].items()], "",
    ]
    lines += ["## Schemes on this model's shapes", "", "| scheme | weight block | |", "| --- | --- | --- |",
              *[f"| {k} | {s.get('block', '-')} | {'dropped: ' + s['dropped'] if 'dropped' in s else 'kept'} |" for k, s in result["schemes"].items()], ""]
    if result["problems"]:
        lines += ["## Problems", "", *[f"- {p}" for p in result["problems"]], ""]
    return "\n".join(lines)


def base_model_dir(config: Config) -> str | None:
    """The base checkpoint folder the plan reads config.json from; None for the bootstrap model (its settings)."""
    return None if config.base_model == "bootstrap" else config.base_model


def checked_plan(config: Config) -> dict:
    """The plan, made when the workflow is parsed: PlanError, before any job, when the config cannot run."""
    arch, source = model_architecture(base_model_dir(config), config.bootstrap)
    result = plan_for(arch, config) | {"source": source}
    if not result["fits"]:
        raise PlanError(refusal(result))
    return result


def refusal(result: dict) -> str:
    return "plan: the config cannot run:\n" + "\n".join(f"  {p}" for p in result["problems"])


PLANNED = ("cluster", "finetune", "data", "evaluate", "benchmark", "engine", "quantize")
"""The sections the plan reads, recorded as the plan job's MLflow params."""


def plan(model_dir: str | None, config: Config, json_path: str | Path, md_path: str | Path, tracking) -> dict:
    """Write the plan (JSON and Markdown), log it to MLflow, and raise PlanError when the config cannot run."""
    import mlflow

    from workflow.tracking import job_run

    arch, source = model_architecture(model_dir, config.bootstrap)
    result = plan_for(arch, config)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2))
    Path(md_path).write_text(markdown(result, source))
    with job_run(tracking, "plan", config.model_dump(mode="json", include=set(PLANNED))):
        mlflow.log_artifact(str(json_path))
        mlflow.log_artifact(str(md_path))
        metrics = {"params": result["model"]["params"], "training_host_per_node_gib": result["training"]["host_per_node_gib"]}
        if result["training"]["device_gib"] is not None:
            metrics["training_gib_per_gpu"] = result["training"]["device_gib"]
        metrics |= {f"serving_{k}_gib_per_device": v["device_gib"] for k, v in result["serving"].items()}
        mlflow.log_metrics(metrics)
        mlflow.set_tag("ft2prod.plan", "fits" if result["fits"] else "does not fit")
        if not result["fits"]:
            raise PlanError(refusal(result))
    return result
