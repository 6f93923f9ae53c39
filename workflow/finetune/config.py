"""The DeepSpeed config the fine-tuning settings imply (FinetuneConfig, declared in workflow/config.py), and checkpoints."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from workflow.config import FinetuneConfig

COMPLETE = ".complete"
"""Marker written into a checkpoint folder once every rank has saved its part."""


def deepspeed_config(cfg: FinetuneConfig, parameters: int | None = None, world_size: int = 1,
                     gpu_bytes: int | None = None) -> dict:
    """The DeepSpeed config; "auto" values are filled by the Trainer from its own arguments.

    parameters, world_size and gpu_bytes (one GPU's memory) size the ZeRO knobs under zero_tuning: auto.
    """
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage >= 2:
        # Gradients go into one contiguous buffer; "auto" buckets are sized from the model's hidden size by the
        # Trainer (hidden^2), which keeps reduce and prefetch launches few and large.
        zero.update(contiguous_gradients=True, overlap_comm=True, reduce_bucket_size="auto")
    if cfg.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
        # Full fine-tunes are consolidated from the fp32 shards on export; LoRA adapters are gathered on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = cfg.method == "lora"
    if cfg.tunes_zero and parameters and cfg.zero_stage >= 2:
        zero.update(zero_knobs(cfg.zero_stage, parameters, world_size, gpu_bytes))
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,
    }
    if cfg.zero_tuning == "auto" and cfg.precision == "bf16":
        # DeepSpeed scans every gradient for inf/NaN before each bf16 step (two reductions and a host sync per
        # tensor group) to skip the step, a rescue meant for fp16 loss scaling: bf16 needs no scaling, and a
        # non-finite loss stops the run instead (callbacks.StopOnNonFiniteLoss).
        config["bf16"]["check_grad_overflow"] = False
    if cfg.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return config


DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed's own default bucket (elements) for reductions and gathers."""


def zero_knobs(stage: int, parameters: int, world_size: int, gpu_bytes: int | None) -> dict:
    """ZeRO-2/3 settings for a model of `parameters` on `world_size` ranks (zero_tuning: auto).

    The Trainer's "auto" buckets hold hidden_size^2 elements (4 M for a 2048-wide model): hundreds of small
    gradient copies and reductions a step. One rank has nothing to reduce, so its whole gradient goes in one
    bucket with no side stream; several ranks use DeepSpeed's 500 M buckets (at most the model), overlapped with the backward.
    ZeRO-3 keeps every parameter whole on each rank (persistent: no gather and release around each module)
    when there is one rank or the 16-bit weights take at most 1/16 of a GPU; gradients and optimizer states
    stay partitioned either way.
    """
    alone = world_size == 1
    # DeepSpeed allocates the bucket (two with overlap_comm) up front: never larger than the model.
    knobs = {"reduce_bucket_size": parameters if alone else min(parameters, DEEPSPEED_BUCKET), "overlap_comm": not alone}
    if stage == 3:
        small = gpu_bytes is not None and 2 * parameters * 16 <= gpu_bytes
        if alone or small:
            knobs["stage3_param_persistence_threshold"] = parameters
        knobs["stage3_prefetch_bucket_size"] = min(parameters, DEEPSPEED_BUCKET)
    return knobs


def latest_complete_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest fully written checkpoint-N folder; half-written ones (a kill mid-save) are removed."""
    found = []
    for path in Path(checkpoint_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not match or not path.is_dir():
            continue
        if (path / COMPLETE).exists():
            found.append((int(match.group(1)), path))
        else:
            shutil.rmtree(path)
    return str(max(found)[1]) if found else None
