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
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from workflow.finetune.config import COMPLETE, FinetuneConfig, deepspeed_config, latest_complete_checkpoint

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

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
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
        if state.global_step >= state.max_steps:
            control.should_save = True


def training_arguments(cfg: FinetuneConfig, out_dir: str, seed: int, on_cpu: bool) -> TrainingArguments:
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
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.precision == "bf16",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="epoch",
        deepspeed=deepspeed_config(cfg),
        report_to=[],
        seed=seed,
        use_cpu=on_cpu,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all",
        disable_tqdm=True,
    )


def train(job: dict) -> dict:
    cfg = FinetuneConfig(**job["finetune"])
    on_cpu = not torch.cuda.is_available()
    args = training_arguments(cfg, job["checkpoint_dir"], job["seed"], on_cpu)
    if on_cpu:
        import deepspeed

        # On CPU the Trainer would set up distributed state after zero.Init needs it (see shared NOTES).
        deepspeed.init_distributed(dist_backend="gloo")
    if args.process_index == 0:
        log.info("resolved settings: %s", json.dumps(job, indent=1))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype)
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
    if cfg.packing:
        collator = DataCollatorWithFlattening()
    else:
        collator = DataCollatorForSeq2Seq(tokenizer=None, label_pad_token_id=-100, padding=True)
    val = Path(job["data_dir"]) / "val.jsonl"
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(Path(job["data_dir"]) / "train.jsonl"),
        eval_dataset=TokenDataset(val) if val.stat().st_size else None,
        data_collator=collator,
        callbacks=[MlflowMetrics(os.environ.get("MLFLOW_RUN_ID"))],
    )
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
    }


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
