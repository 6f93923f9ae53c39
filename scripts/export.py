"""Snakemake adapter for rule export: consolidate the final checkpoint into a model folder."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import FinetuneConfig
from workflow.finetune.export import export
from workflow.tracking import Tracking

export(
    base_dir=snakemake.input.model,
    summary_path=snakemake.input.summary,
    out_dir=snakemake.output.model,
    cfg=FinetuneConfig(**snakemake.params.settings),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
