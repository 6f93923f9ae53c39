"""Snakemake adapter for rule plan: memory per device for training and serving, checked against `cluster:`."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from pathlib import Path

from workflow.plan import plan
from workflow.tracking import Tracking

plan(
    model_dir=str(Path(snakemake.input[0]).parent) if len(snakemake.input) else None,  # no config.json: the bootstrap settings
    settings=snakemake.params.settings,
    json_path=snakemake.output.plan,
    md_path=snakemake.output.report,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
