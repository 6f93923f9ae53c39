"""Snakemake adapter for rule export: consolidate the final checkpoint into a model folder."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.finetune.export import export
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

export(
    base_dir=snakemake.input.model,
    summary_path=snakemake.input.summary,
    out_dir=snakemake.output.model,
    cfg=config.finetune,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
