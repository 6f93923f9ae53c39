"""Snakemake adapter for rule finetune: DeepSpeed training through torchrun or the deepspeed launcher."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.finetune.config import FinetuneConfig
from workflow.finetune.launch import run
from workflow.tracking import Tracking

run(
    snakemake.input.model,
    Path(snakemake.input.train).parent,
    snakemake.output.summary,
    FinetuneConfig(**snakemake.params.settings),
    snakemake.params.seed,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
    snakemake.log[0],
)
