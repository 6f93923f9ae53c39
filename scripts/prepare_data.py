"""Snakemake adapter for rule prepare_data: check, deduplicate, split and render the dataset."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.data import DataConfig, prepare
from workflow.tracking import Tracking

prepare(
    snakemake.input.dataset,
    snakemake.input.model,
    Path(snakemake.output.stats).parent,
    DataConfig(**snakemake.params.settings),
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
