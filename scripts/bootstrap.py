"""Snakemake adapter for rule bootstrap: build the embedded default base model."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.bootstrap.model import bootstrap
from workflow.config import settings
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

bootstrap(
    cfg=config.bootstrap,
    out_dir=snakemake.output.model,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
