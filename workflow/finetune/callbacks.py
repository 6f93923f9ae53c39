"""The fine-tune's Trainer callbacks: metrics into MLflow, checkpoint marks, the non-finite-loss stop, timing,
profiling and layer checkpointing."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from workflow.finetune.config import COMPLETE
from workflow.finetune.memory import checkpointed_indices
from workflow.finetune.speed import decoder_layers
from workflow.progress import Progress

log = logging.getLogger("workflow.finetune")


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


class StepProgress(TrainerCallback):
    """Steps done of max_steps with rate and ETA (workflow/progress.py), and the last logged loss and tokens/s
    (rank 0 only)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.last = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = Progress(state.max_steps, "finetune", unit="step", initial=state.global_step).__enter__()
            self.last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(state.global_step - self.progress.done)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.progress or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        status = {"loss": float(logs["loss"])} if "loss" in logs else {}
        if tokens > self.last[1]:
            status["tokens/s"] = round((tokens - self.last[1]) / (now - self.last[0]))
            self.last = (now, tokens)
        self.progress.update(0, **status)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.__exit__(None, None, None)
            self.progress = None


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


class Checkpoints(TrainerCallback):
    """Resumable checkpoints the launcher can trust: each is marked complete once every rank wrote its part, and
    the final step is always saved."""

    def __init__(self, save_final: bool = True) -> None:
        self.save_final = save_final

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
