"""Snakemake adapter for rule register: a new MLflow model version for the package, alias candidate."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.package.stage import register
from workflow.tracking import Tracking

register(
    package_dir=snakemake.input[0],
    out_path=snakemake.output[0],
    model_name=snakemake.params.model_name,
    settings=snakemake.params.settings,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
