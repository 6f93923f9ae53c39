"""Snakemake adapter for rules benchmark_*: continuous-load benchmark of one engine."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.benchmark import LoadConfig, benchmark
from workflow.tracking import Tracking

load = snakemake.params.load
benchmark(
    snakemake.input.engine,
    snakemake.input.tokenizer,
    snakemake.output[0],
    snakemake.wildcards.scheme,
    snakemake.params.settings,
    LoadConfig(**{**load, "concurrency": tuple(load["concurrency"])}),
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
