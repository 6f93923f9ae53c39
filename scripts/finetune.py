"""Snakemake adapter for rule finetune: DeepSpeed training through torchrun or the deepspeed launcher."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.finetune.launch import finetune
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

finetune(
    model_dir=snakemake.input.model,
    data_dir=Path(snakemake.input.train).parent,
    summary_path=snakemake.output.summary,
    cfg=config.finetune,
    seed=config.seed,
    tracking=Tracking.from_config(config, snakemake.log[0]),
    log_path=snakemake.log[0],
)
