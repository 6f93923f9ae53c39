"""Snakemake adapter for rule prepare_data: check, deduplicate, split and render the dataset."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.data import prepare_data
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

prepare_data(
    source=snakemake.input.dataset,
    tokenizer_dir=snakemake.input.model,
    out_dir=Path(snakemake.output.stats).parent,
    cfg=config.data,
    tracking=Tracking.from_config(config, snakemake.log[0]),
    seed=config.seed,
    eval_path=config.evaluate.path,
)
