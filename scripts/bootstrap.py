"""Snakemake adapter for rule bootstrap: build the embedded default base model."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.bootstrap.model import bootstrap
from workflow.config import BootstrapConfig
from workflow.tracking import Tracking

bootstrap(
    cfg=BootstrapConfig(**snakemake.params.settings),
    out_dir=snakemake.output.model,
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
