"""gradient_checkpointing auto, resolved on the rank's own GPU with the planner's memory model (workflow.capacity).

The plan rule checks before anything queues that the run can fit (every layer checkpointed if need be); here, on
the GPU that trains, the same model picks how many decoder layers to recompute: the fewest whose predicted peak
stays under (1 - HEADROOM) of this GPU's memory. Recomputing a layer costs about a third of its compute again, so
checkpointing only what memory needs is faster than checkpointing every layer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from workflow.capacity import (
    GIB,
    Architecture,
    Cluster,
    PlanError,
    Training,
    training_memory,
)
from workflow.config import FinetuneConfig

log = logging.getLogger("workflow.finetune")

HEADROOM = 0.10
"""Share of the GPU kept out of the prediction: the CUDA context and NCCL buffers (outside torch's allocator),
allocator fragmentation, and the model's own error (within a few per cent of measured peaks on H200s)."""


def memory_plan(cfg: FinetuneConfig, model_dir: str | Path, world_size: int, gpu_bytes: int | None, longest_row: int,
                liger_kernel: bool) -> dict:
    """How many decoder layers to checkpoint, and the predicted peak memory per GPU with that choice.

    The micro-batch is counted as micro_batch_size rows of the longest row's length (packed rows never exceed it).
    On a CPU (gpu_bytes None) auto checkpoints nothing, as before: the plan checks host memory.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    try:
        arch = Architecture.from_hf_config(config, str(Path(model_dir) / "config.json"))
    except PlanError as unmodelled:
        if gpu_bytes is not None:
            log.warning("%s: gradient_checkpointing auto checkpoints nothing and micro_batch_fill keeps the configured micro-batch", unmodelled)
        arch = None
    if arch is None or gpu_bytes is None:
        # CPU ranks (the plan checks host memory) and architectures the planner does not model: nothing is predicted.
        layers = config.get("num_hidden_layers", 0)
        return {"gradient_checkpointing": cfg.gradient_checkpointing, "checkpointed_layers": layers if cfg.gradient_checkpointing is True else 0,
                "num_layers": layers, "tokens_per_micro_batch": cfg.micro_batch_size * longest_row, "predicted_peak_gib": None,
                "limit_gib": None, "fits": arch is not None, "phases_gib": None, "per_process_gib": None}
    training = Training.of(cfg, longest_row, world_size, liger_kernel=liger_kernel,
                           gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    limit = gpu_bytes * (1 - HEADROOM) / GIB
    memory = training_memory(arch, training, Cluster(gpus_per_node=world_size, gpu_memory_gib=limit, host_memory_gib=float("inf"),
                                                     overhead_gib=0.0))
    return {
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "checkpointed_layers": memory["setup"]["checkpointed_layers"],
        "num_layers": arch.num_layers,
        "tokens_per_micro_batch": cfg.micro_batch_size * longest_row,
        "predicted_peak_gib": memory["device_gib"],
        "limit_gib": round(limit, 2),
        "fits": memory["fits"],
        "phases_gib": memory["phases_gib"],
        "per_process_gib": memory["per_process_gib"],
    }


def checkpointed_indices(count: int, layers: int) -> list[int]:
    """Which of `layers` decoder layers recompute: `count` of them, spread evenly (every layer for count == layers)."""
    return [i for i in range(layers) if (i * count) // layers != ((i + 1) * count) // layers]


def fill_micro_batch(cfg: FinetuneConfig, model_dir: str | Path, world_size: int, gpu_bytes: int | None, longest_row: int,
                     liger_kernel: bool) -> tuple[FinetuneConfig, dict]:
    """micro_batch_fill auto: the largest micro-batch that divides the rows per optimizer step (micro_batch_size x
    gradient_accumulation_steps) and fits without checkpointing more layers than the configured micro-batch needs,
    with the accumulation that keeps the rows per step; and its memory plan. Unchanged on CPUs and with fill off."""
    configured = memory_plan(cfg, model_dir, world_size, gpu_bytes, longest_row, liger_kernel)
    rows = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    if cfg.micro_batch_fill != "auto" or gpu_bytes is None or cfg.gradient_accumulation_steps == 1:
        return cfg, configured
    for size in range(rows, cfg.micro_batch_size, -1):
        if rows % size:
            continue
        trial = cfg.model_copy(update={"micro_batch_size": size, "gradient_accumulation_steps": rows // size})
        plan = memory_plan(trial, model_dir, world_size, gpu_bytes, longest_row, liger_kernel)
        if plan["fits"] and plan["checkpointed_layers"] <= configured["checkpointed_layers"]:
            return trial, plan
    return cfg, configured
