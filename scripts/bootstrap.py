"""Snakemake adapter for rule bootstrap: build the embedded default base model."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.bootstrap.model import BootstrapConfig, build
from workflow.tracking import Tracking

build(BootstrapConfig(**snakemake.params.settings), snakemake.output.model, Tracking.from_config(snakemake.config, snakemake.log[0]))
