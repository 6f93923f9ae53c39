"""Snakemake adapter for rule finetune: DeepSpeed training through torchrun or the deepspeed launcher."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import FinetuneConfig
from workflow.finetune.launch import finetune
from workflow.tracking import Tracking

finetune(
    model_dir=snakemake.input.model,
    data_dir=Path(snakemake.input.train).parent,
    summary_path=snakemake.output.summary,
    cfg=FinetuneConfig(**snakemake.params.settings),
    seed=snakemake.params.seed,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
    log_path=snakemake.log[0],
)
