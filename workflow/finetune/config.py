"""Typed fine-tuning settings (the `finetune:` section of config.yaml) and the DeepSpeed config they imply."""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

COMPLETE = ".complete"
"""Marker written into a checkpoint folder once every rank has saved its part."""


ATTENTION = ("auto", "varlen", "sdpa", "flex_attention", "eager")
ZERO_TUNING = ("auto", "stock")
OPTIMIZERS = {"adamw_fused": "adamw_torch_fused", "adamw_foreach": "adamw_torch"}
"""The optimizer setting and the Transformers optimizer name it stands for."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator (the adapter output is scaled by alpha / r)."""
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "full"
    """full: every parameter; lora: a PEFT adapter, merged into the base on export."""
    launcher: str = "torchrun"
    """torchrun or deepspeed: starts one process per device."""
    nproc_per_node: int = 2
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "fp32"
    epochs: float = 3
    max_steps: int = -1
    micro_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    micro_batch_fill: str = "auto"
    """auto: on GPUs, fewer and larger micro-batches with the same rows per optimizer step (micro_batch_size x
    gradient_accumulation_steps), as large as the planner's memory model fits without recomputing more layers; off:
    as configured. Each micro-batch costs ZeRO-2/3 a gradient reduction (and ZeRO-3 two parameter gathers)."""
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool | str = "auto"
    """auto: on GPUs the fewest decoder layers recompute their activations for the run to fit (the planner's memory
    model on the GPU that trains; none when everything fits, none on CPUs); true: every layer; false: none."""
    packing: bool = True
    """Padding-free micro-batches with per-sequence position ids (block-diagonal attention)."""
    attention: str = "auto"
    """auto, varlen, sdpa, flex_attention or eager; auto is varlen on a CUDA GPU with packing, sdpa otherwise."""
    liger_kernel: bool = True
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on CUDA GPUs; skipped on CPU."""
    optimizer: str = "adamw_fused"
    """adamw_fused (one fused kernel per step) or adamw_foreach (torch's multi-tensor AdamW)."""
    torch_compile: bool = False
    """torch.compile each decoder layer's forward (any device; ZeRO-3 runs eagerly). Measured no faster on an H200."""
    dataloader_workers: int = 2
    """Processes that read and collate batches beside each rank (0: in the training process)."""
    zero_tuning: str = "auto"
    """auto: ZeRO-2/3 buckets, ZeRO-3 parameter persistence and leaf modules sized from the model and the number
    of ranks (full fine-tunes; LoRA keeps stock), and no bf16 gradient overflow scan; stock: DeepSpeed's and the
    Trainer's own values (buckets of hidden_size^2)."""
    save_steps: int = 40
    save_total_limit: int = 2
    logging_steps: int = 10
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        allowed = {
            "method": ("full", "lora"),
            "launcher": ("torchrun", "deepspeed"),
            "zero_stage": (0, 1, 2, 3),
            "precision": ("fp32", "bf16"),
            "lr_scheduler": ("cosine", "linear", "constant_with_warmup"),
            "attention": ATTENTION,
            "optimizer": tuple(OPTIMIZERS),
            "zero_tuning": ZERO_TUNING,
            "torch_compile": (True, False),
            "gradient_checkpointing": (True, False, "auto"),
            "micro_batch_fill": ("auto", "off"),
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                shown = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
                raise ValueError(f"finetune.{key} must be one of {shown} (got {getattr(self, key)!r})")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"finetune.offload_params needs zero_stage 3 (got zero_stage {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("finetune.offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        if self.attention == "varlen" and not self.packing:
            raise ValueError("finetune.attention varlen needs packing: true (it reads the packed sequence boundaries); use auto or sdpa")
        if self.dataloader_workers < 0:
            raise ValueError(f"finetune.dataloader_workers must be 0 or more (got {self.dataloader_workers})")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSettings(**{**self.lora, "target_modules": tuple(self.lora.get("target_modules", LoraSettings.target_modules))}))

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def tunes_zero(self) -> bool:
        """Whether zero_tuning: auto applies: full fine-tunes only (LoRA's few trainable weights keep stock values)."""
        return self.zero_tuning == "auto" and self.method == "full"


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
