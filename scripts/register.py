"""Snakemake adapter for rule register: a new MLflow model version for the package, alias candidate."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.package.stage import register
from workflow.tracking import Tracking

register(
    snakemake.input[0],
    snakemake.output[0],
    snakemake.params.model_name,
    snakemake.params.settings,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
