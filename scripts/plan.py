"""Snakemake adapter for rule plan: memory per device for training and serving, checked against `cluster:`."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from pathlib import Path

from workflow.plan import run
from workflow.tracking import Tracking

run(
    str(Path(snakemake.input[0]).parent) if len(snakemake.input) else None,  # no config.json: the bootstrap settings
    snakemake.params.settings,
    snakemake.output.plan,
    snakemake.output.report,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
