"""The job file the training ranks read (results/finetune/checkpoints/job.json), declared: the validated finetune
section, the paths, and the measurement settings benchmarks/finetune_throughput.py sets (the rule keeps the defaults)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictBool

from workflow.config import FinetuneConfig, Section


class Measurement(Section):
    """How a run is timed and profiled; the finetune rule leaves the defaults."""

    save_checkpoints: StrictBool = True
    """Write resumable checkpoints and the final one (the throughput benchmark turns it off unless it consolidates)."""
    timing_skip_steps: Annotated[int, Field(ge=0)] = 2
    """Optimizer steps left out of the throughput figure (warm-up, compilation)."""
    timing_end_step: Annotated[int, Field(ge=1)] | None = None
    """The last step timed; None times to the end."""
    profile_dir: str | None = None
    """Write a torch profiler trace here; None profiles nothing."""
    profile_start: Annotated[int, Field(ge=0)] | None = None
    """The step the profiler starts at; None is timing_skip_steps."""


class Job(Section):
    """Everything a rank needs: settings, paths and the checkpoint to resume from."""

    finetune: FinetuneConfig
    """The validated finetune section, whole."""
    seed: int
    """The config's seed."""
    model_dir: str
    """The base checkpoint."""
    data_dir: str
    """The folder with train.jsonl and val.jsonl."""
    checkpoint_dir: str
    """Where resumable checkpoints go."""
    summary: str
    """Where rank 0 writes the run's summary."""
    fingerprint: str
    """Digest of trained_from: names the folder old checkpoints are moved aside to."""
    trained_from: dict
    """What the checkpoints were trained from (finetune settings less those that only change how the run goes or
    reports, seed, base model and data digests): checkpoints resume when only those or the run's length changed."""
    resume_from: str | None
    """The newest complete checkpoint of this fingerprint, if any."""
    measure: Measurement = Measurement()
    """How the run is timed and profiled."""
