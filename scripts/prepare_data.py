"""Snakemake adapter for rule prepare_data: check, deduplicate, split and render the dataset."""
from pathlib import Path

from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import DataConfig
from workflow.data import prepare_data
from workflow.tracking import Tracking

prepare_data(
    source=snakemake.input.dataset,
    tokenizer_dir=snakemake.input.model,
    out_dir=Path(snakemake.output.stats).parent,
    cfg=DataConfig(**snakemake.params.settings),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
    seed=snakemake.params.seed,
    eval_path=snakemake.input.evaluation or None,
)
