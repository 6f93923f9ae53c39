"""Snakemake adapter for rule generate_data: the built-in arithmetic reasoning dataset."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.bootstrap.problems import write_jsonl
from workflow.tracking import Tracking

write_jsonl(snakemake.output[0], snakemake.params.rows, snakemake.params.seed, Tracking.from_config(snakemake.config, snakemake.log[0]))
