"""Snakemake adapter for rule generate_data: the built-in arithmetic reasoning dataset."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.bootstrap.problems import generate_data
from workflow.config import settings
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

generate_data(
    path=snakemake.output[0],
    rows=config.data.generated_rows,
    seed=config.seed,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
