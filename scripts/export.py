"""Snakemake adapter for rule export: consolidate the final checkpoint into a model folder."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.finetune.config import FinetuneConfig
from workflow.finetune.export import export
from workflow.tracking import Tracking

export(
    snakemake.input.model,
    snakemake.input.summary,
    snakemake.output.model,
    FinetuneConfig(**snakemake.params.settings),
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
