"""Snakemake adapter for rule generate_data: the built-in arithmetic reasoning dataset."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.bootstrap.problems import generate_data
from workflow.tracking import Tracking

generate_data(
    path=snakemake.output[0],
    rows=snakemake.params.rows,
    seed=snakemake.params.seed,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
