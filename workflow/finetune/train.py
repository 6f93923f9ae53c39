"""One rank of the fine-tune: setup, train (resuming from the latest checkpoint), save.

    torchrun --nproc_per_node 2 -m workflow.finetune.train --job results/finetune/checkpoints/job.json

Started by workflow.finetune.launch through torchrun or the deepspeed launcher; the job file holds the
resolved settings. Rank 0 logs to the MLflow run named by MLFLOW_RUN_ID.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainingArguments,
)

from workflow.config import FinetuneConfig
from workflow.finetune.job import Job
from workflow.finetune.batches import TokenDataset, collator
from workflow.finetune.callbacks import (
    CheckpointLayers,
    Checkpoints,
    MlflowMetrics,
    Profile,
    StepProgress,
    StopOnNonFiniteLoss,
    Throughput,
)
from workflow.finetune.config import deepspeed_config, latest_complete_checkpoint
from workflow.finetune.memory import fill_micro_batch
from workflow.finetune.speed import (
    VARLEN,
    SpeedSettings,
    compile_decoder_layers,
    decoder_layers,
    register_varlen_attention,
    resolve,
)

log = logging.getLogger("workflow.finetune")


def training_arguments(cfg: FinetuneConfig, out_dir: str, seed: int, on_cpu: bool, speed: SpeedSettings,
                       deepspeed: dict, evaluate: bool = True, save: bool = True, checkpointing: bool = False) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        gradient_checkpointing=checkpointing,
        bf16=cfg.precision == "bf16",
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="epoch" if evaluate else "no",
        deepspeed=deepspeed,
        report_to=[],
        seed=seed,
        use_cpu=on_cpu,
        remove_unused_columns=False,
        # Real tokens: padded batches carry an attention mask to count them by; packed ones have no padding.
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding",
        # A non-finite loss is logged as it is, and StopOnNonFiniteLoss stops the run on it.
        logging_nan_inf_filter=False,
        disable_tqdm=True,
        optim=speed.optimizer,
        use_liger_kernel=speed.liger_kernel,
        liger_kernel_config=speed.liger_kernel_config,
        dataloader_num_workers=speed.dataloader_workers,
        dataloader_persistent_workers=speed.dataloader_workers > 0,
        dataloader_pin_memory=speed.pin_memory,
    )


def log_resolved(job: Job, cfg: FinetuneConfig, configured: FinetuneConfig, speed: SpeedSettings, ds_config: dict,
                 memory: dict, on_cpu: bool) -> None:
    """Rank 0: the resolved settings, what this device changed or skipped, and the planner's memory verdict (also
    recorded in the job's MLflow run)."""
    checkpointed = memory["checkpointed_layers"]
    log.info("resolved settings: %s", job.model_dump_json(indent=1))
    log.info("speed settings on this device: %s", json.dumps(speed.as_dict()))
    log.info("zero_optimization: %s", json.dumps(ds_config["zero_optimization"]))
    for reason in speed.skipped:
        log.info("skipped %s", reason)
    log.info("gradient_checkpointing %s: %d of %d decoder layers recompute; predicted peak %s GiB per GPU (limit %s GiB)",
             cfg.gradient_checkpointing, checkpointed, memory["num_layers"], memory["predicted_peak_gib"], memory["limit_gib"])
    if cfg != configured:
        log.info("micro_batch_fill auto: micro-batch %d x accumulation %d (configured %d x %d; same rows per optimizer step)",
                 cfg.micro_batch_size, cfg.gradient_accumulation_steps, configured.micro_batch_size, configured.gradient_accumulation_steps)
    if on_cpu and cfg.gradient_checkpointing == "auto":
        log.info("skipped gradient_checkpointing auto: CPU ranks checkpoint nothing (the plan checks host memory)")
    elif memory["predicted_peak_gib"] is not None and not memory["fits"]:
        log.warning("the planner predicts %s GiB per GPU even with %d layers checkpointed, over %s GiB: this run may run out of memory",
                    memory["predicted_peak_gib"], checkpointed, memory["limit_gib"])
    record_speed(os.environ.get("MLFLOW_RUN_ID"), speed, ds_config["zero_optimization"], memory)


def load_model(model_dir: str, cfg: FinetuneConfig, speed: SpeedSettings, rank0: bool):
    """The base model with this device's attention, LoRA adapters if asked, ZeRO-3 leaf layers and compiled layers."""
    if speed.attention == VARLEN:
        register_varlen_attention()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=speed.attention)
    # Training needs no KV cache, and packing needs it off: with a cache, transformers ignores the
    # restarting position ids and lets packed sequences attend to each other.
    model.config.use_cache = False
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        model = get_peft_model(
            model,
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM"),
        )
    if cfg.zero_stage == 3 and cfg.tunes_zero:
        # ZeRO-3 gathers and releases each decoder layer's parameters as one unit (as FSDP wraps them), not each
        # linear layer's: a tenth of the hooks and fewer, larger all-gathers.
        from deepspeed.utils import set_z3_leaf_module

        for layer in decoder_layers(model):
            set_z3_leaf_module(layer, True)
    if speed.torch_compile:
        count = compile_decoder_layers(model)
        if rank0:
            log.info("compiled the forward of %d decoder layers with torch.compile", count)
    return model


def make_trainer(job: Job, cfg: FinetuneConfig, args: TrainingArguments, model, train_rows: TokenDataset, val: Path | None,
                 speed: SpeedSettings, memory: dict) -> tuple[Trainer, Throughput]:
    """The Trainer with the workflow's callbacks: MLflow metrics, checkpoints, the non-finite-loss stop, throughput,
    and (as the job asks) partial layer checkpointing and the profiler."""
    measure = job.measure
    throughput = Throughput(skip=measure.timing_skip_steps, end=measure.timing_end_step)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=TokenDataset(val) if val else None,
        data_collator=collator(cfg, speed),
        callbacks=[MlflowMetrics(os.environ.get("MLFLOW_RUN_ID")), Checkpoints(save_final=measure.save_checkpoints),
                   StopOnNonFiniteLoss(), throughput, StepProgress()],
    )
    if 0 < memory["checkpointed_layers"] < memory["num_layers"]:
        trainer.add_callback(CheckpointLayers(memory["checkpointed_layers"]))
    if measure.profile_dir:
        start = measure.timing_skip_steps if measure.profile_start is None else measure.profile_start
        trainer.add_callback(Profile(measure.profile_dir, start=start))
    return trainer, throughput


def train(job: Job) -> dict:
    """Fine-tune one rank: resolve the settings for this device, build the model and Trainer, train (resuming when
    the launcher found a checkpoint), and return the run's summary."""
    configured = job.finetune
    on_cpu = not torch.cuda.is_available()
    speed = resolve(configured, cuda=not on_cpu)
    val = Path(job.data_dir) / "val.jsonl"
    val = val if val.exists() and val.stat().st_size > 0 else None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gpu_bytes = None if on_cpu else torch.cuda.get_device_properties(0).total_memory
    train_rows = TokenDataset(Path(job.data_dir) / "train.jsonl")
    cfg, memory = fill_micro_batch(configured, job.model_dir, world_size, gpu_bytes,
                                   max(len(r["input_ids"]) for r in train_rows.rows), speed.liger_kernel)
    memory |= {"micro_batch_size": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    ds_config = deepspeed_config(cfg, count_parameters(job.model_dir), world_size, gpu_bytes)
    args = training_arguments(cfg, job.checkpoint_dir, job.seed, on_cpu, speed, ds_config, evaluate=val is not None,
                              save=job.measure.save_checkpoints,
                              checkpointing=cfg.gradient_checkpointing is True or memory["checkpointed_layers"] > 0)
    if on_cpu:
        import deepspeed

        from workflow.finetune import ops

        ops.skip_inference_all_reduce()
        # On CPU the Trainer would set up distributed state after zero.Init needs it (see shared NOTES).
        deepspeed.init_distributed(dist_backend="gloo")
    if args.process_index == 0:
        log_resolved(job, cfg, configured, speed, ds_config, memory, on_cpu)
    model = load_model(job.model_dir, cfg, speed, rank0=args.process_index == 0)
    trainer, throughput = make_trainer(job, cfg, args, model, train_rows, val, speed, memory)
    resume = job.resume_from
    if args.process_index == 0:
        log.info("resuming from %s" % resume if resume else "starting from step 0 (no checkpoint)")
    result = trainer.train(resume_from_checkpoint=resume)
    return {
        "checkpoint": latest_complete_checkpoint(job.checkpoint_dir),
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "log_history": trainer.state.log_history,
        "speed": speed.as_dict(),
        "memory": memory,
        "throughput": throughput.result,
    }


def count_parameters(model_dir: str) -> int:
    """The model's parameter count, from its config on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def record_speed(run_id: str | None, speed: SpeedSettings, zero: dict, memory: dict) -> None:
    """The speed settings, ZeRO knobs and checkpointed layers as this device resolved them, beside the configured
    ones in the job's MLflow run."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in speed.as_dict().items():
        client.log_param(run_id, f"resolved.{key}", value)
    client.log_param(run_id, "resolved.zero_optimization", json.dumps(zero))
    client.log_param(run_id, "resolved.checkpointed_layers", f"{memory['checkpointed_layers']} of {memory['num_layers']}")
    client.log_param(run_id, "resolved.micro_batch_size", memory["micro_batch_size"])
    client.log_param(run_id, "resolved.gradient_accumulation_steps", memory["gradient_accumulation_steps"])
    if memory["predicted_peak_gib"] is not None:
        client.log_param(run_id, "resolved.predicted_peak_gib", memory["predicted_peak_gib"])
    if speed.skipped:
        client.set_tag(run_id, "ft2prod.finetune.skipped", "; ".join(speed.skipped))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", required=True, help="job.json written by workflow.finetune.launch")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    job = Job.model_validate_json(Path(args.job).read_text())
    summary = train(job)
    if rank == 0:
        Path(job.summary).write_text(json.dumps(summary, indent=2))
    # Leave together and tear the process group down: a rank that exits with gloo (ZeRO-3) threads
    # still running aborts ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
