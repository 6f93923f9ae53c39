"""One rank of the fine-tune: setup, train (resuming from the latest checkpoint), save.

    torchrun --nproc_per_node 2 -m workflow.finetune.train --job results/finetune/checkpoints/job.json

Started by workflow.finetune.launch through torchrun or the deepspeed launcher; the job file holds the
resolved settings. Rank 0 logs to the MLflow run named by MLFLOW_RUN_ID.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from workflow.finetune.config import COMPLETE, FinetuneConfig, deepspeed_config, latest_complete_checkpoint
from workflow.finetune.memory import checkpointed_indices, fill_micro_batch
from workflow.finetune.speed import (
    VARLEN,
    SpeedSettings,
    compile_decoder_layers,
    decoder_layers,
    register_varlen_attention,
    resolve,
)

log = logging.getLogger("workflow.finetune")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, path: str | Path) -> None:
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
        self.rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class MlflowMetrics(TrainerCallback):
    """Training loss, learning rate and tokens/s per logging step into the job's MLflow run (rank 0 only)."""

    def __init__(self, run_id: str | None, save_final: bool = True) -> None:
        self.run_id = run_id
        self.save_final = save_final
        self.last = (time.perf_counter(), 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not self.run_id or not logs:
            return
        from mlflow.tracking import MlflowClient

        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and k != "epoch"}
        if tokens > self.last[1]:
            metrics["tokens_per_second"] = (tokens - self.last[1]) / (now - self.last[0])
        self.last = (now, tokens)
        client = MlflowClient()
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            client.log_metric(self.run_id, key, value, timestamp=timestamp, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        # Mark the checkpoint complete once every rank has written its part: a kill mid-save leaves
        # an unmarked folder, which the launcher discards instead of resuming from it.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE).touch()

    def on_step_end(self, args, state, control, **kwargs):
        # Always checkpoint the final step: export reads it, and a finished run is never retrained.
        if self.save_final and state.global_step >= state.max_steps:
            control.should_save = True


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop with a clear error when the logged training loss is inf or NaN: the weights have diverged, and
    training on would only overwrite good checkpoints with broken ones."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"finetune: the training loss is {loss} at step {state.global_step} (mean over the last "
                f"{args.logging_steps} steps): the run diverged. Checkpoints before it are kept; lower "
                f"finetune.learning_rate or raise finetune.warmup_ratio and run again.")


class Throughput(TrainerCallback):
    """Tokens/s over the steps after the first `skip` (compilation, allocator and kernel warm-up), and peak memory.

    The clock is read after a device synchronize at two steps only, so timing does not stall the steps between.
    """

    def __init__(self, skip: int, end: int | None = None) -> None:
        self.skip = skip
        self.end = end
        self.start: tuple[float, int, int] | None = None
        self.result: dict = {}

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        end = min(self.end or state.max_steps, state.max_steps)
        if state.global_step == min(self.skip, end - 1):
            self.start = (self._now(), state.num_input_tokens_seen, state.global_step)
        elif state.global_step == end and self.start:
            seconds = self._now() - self.start[0]
            tokens = state.num_input_tokens_seen - self.start[1]
            self.result = {
                "timed_steps": state.global_step - self.start[2],
                "seconds": seconds,
                "tokens": int(tokens),
                "tokens_per_second": tokens / seconds,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
            }


class Profile(TrainerCallback):
    """torch.profiler over a few steps after warm-up (rank 0): the kernels that take the time and how busy the
    device was. Used by benchmarks/finetune_throughput.py --profile; the rule never sets it."""

    def __init__(self, out_dir: str, start: int, steps: int = 3) -> None:
        self.out_dir, self.start, self.steps = Path(out_dir), start, steps
        self.profiler = None

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.began = time.perf_counter()
        elif self.profiler and state.global_step == self.start + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.began
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            # Kernel events only: an operator's self device time is its kernels' time again.
            device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            table = events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)
            header = (f"{self.steps} steps, wall {wall * 1e3:.0f} ms, device kernels {device_us / 1e3:.0f} ms "
                      f"({device_us / 1e6 / wall:.0%} busy)\n")
            (self.out_dir / "profile.txt").write_text(header + table)
            self.profiler = None


class CheckpointLayers(TrainerCallback):
    """Recompute only `count` decoder layers (gradient_checkpointing auto): the Trainer turns checkpointing on for
    every layer before training starts; this turns it off again on the others."""

    def __init__(self, count: int) -> None:
        self.count = count

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = decoder_layers(model)
        chosen = set(checkpointed_indices(self.count, len(layers)))
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index in chosen


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


def collator(cfg: FinetuneConfig, speed: SpeedSettings):
    if cfg.packing:
        # The varlen kernel reads the sequence boundaries the collator computes on the CPU, once per batch.
        return PaddingFree(DataCollatorWithFlattening(return_flash_attn_kwargs=speed.attention == VARLEN))
    return pad_to_longest


class PaddingFree:
    """Micro-batches without padding: rows of one length are stacked as they are, so attention runs batched
    (cuDNN's fused attention on an H100, faster than the varlen kernel: measured in docs/finetuning.md); rows of
    different lengths are packed into one row with restarting position ids and sequence boundaries.
    Both give the loss the same targets: the first token of each row is never a target."""

    def __init__(self, flatten: DataCollatorWithFlattening) -> None:
        self.flatten = flatten

    def __call__(self, rows: list[dict]) -> dict:
        if len({len(r["input_ids"]) for r in rows}) > 1:
            return self.flatten(rows)
        labels = torch.tensor([r["labels"] for r in rows])
        labels[:, 0] = -100
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows]), "labels": labels}


def pad_to_longest(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch: labels -100 and attention mask 0 on the padding (no tokenizer needed)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train(job: dict) -> dict:
    cfg = FinetuneConfig(**job["finetune"])
    on_cpu = not torch.cuda.is_available()
    speed = resolve(cfg, cuda=not on_cpu)
    val = Path(job["data_dir"]) / "val.jsonl"
    has_val = val.exists() and val.stat().st_size > 0
    save = job.get("save_checkpoints", True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    gpu_bytes = None if on_cpu else torch.cuda.get_device_properties(0).total_memory
    train_rows = TokenDataset(Path(job["data_dir"]) / "train.jsonl")
    configured = cfg
    cfg, memory = fill_micro_batch(cfg, job["model_dir"], world_size, gpu_bytes, max(len(r["input_ids"]) for r in train_rows.rows),
                                   speed.liger_kernel)
    memory |= {"micro_batch_size": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    ds_config = deepspeed_config(cfg, count_parameters(job["model_dir"]), world_size, gpu_bytes)
    checkpointed = memory["checkpointed_layers"]
    args = training_arguments(cfg, job["checkpoint_dir"], job["seed"], on_cpu, speed, ds_config, evaluate=has_val, save=save,
                              checkpointing=cfg.gradient_checkpointing is True or checkpointed > 0)
    if on_cpu:
        import deepspeed

        # On CPU the Trainer would set up distributed state after zero.Init needs it (see shared NOTES).
        deepspeed.init_distributed(dist_backend="gloo")
    if args.process_index == 0:
        log.info("resolved settings: %s", json.dumps(job, indent=1))
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
    if speed.attention == VARLEN:
        register_varlen_attention()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, attn_implementation=speed.attention)
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
        if args.process_index == 0:
            log.info("compiled the forward of %d decoder layers with torch.compile", count)
    throughput = Throughput(skip=job.get("timing_skip_steps", 2), end=job.get("timing_end_step"))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=TokenDataset(val) if has_val else None,
        data_collator=collator(cfg, speed),
        callbacks=[MlflowMetrics(os.environ.get("MLFLOW_RUN_ID"), save_final=save), StopOnNonFiniteLoss(), throughput],
    )
    if 0 < checkpointed < memory["num_layers"]:
        trainer.add_callback(CheckpointLayers(checkpointed))
    if job.get("profile_dir"):
        trainer.add_callback(Profile(job["profile_dir"], start=job.get("profile_start", job.get("timing_skip_steps", 2))))
    resume = job["resume_from"]
    if args.process_index == 0:
        log.info("resuming from %s" % resume if resume else "starting from step 0 (no checkpoint)")
    result = trainer.train(resume_from_checkpoint=resume)
    last = latest_complete_checkpoint(job["checkpoint_dir"])
    return {
        "checkpoint": last,
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
    job = json.loads(Path(args.job).read_text())
    summary = train(job)
    if rank == 0:
        Path(job["summary"]).write_text(json.dumps(summary, indent=2))
    # Leave together and tear the process group down: a rank that exits with gloo (ZeRO-3) threads
    # still running aborts ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
