"""Snakemake adapter for rule register: a new MLflow model version for the package, alias candidate."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.package.stage import register
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

register(
    package_dir=snakemake.input[0],
    out_path=snakemake.output[0],
    settings=config.package,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
