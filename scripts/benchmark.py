"""Snakemake adapter for rules benchmark_*: continuous-load benchmark of one engine."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.benchmark import LoadConfig, benchmark
from workflow.tracking import Tracking

load = snakemake.params.load
benchmark(
    engine_dir=snakemake.input.engine,
    tokenizer_dir=snakemake.input.tokenizer,
    out_path=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    settings=snakemake.params.settings,
    cfg=LoadConfig(**{**load, "concurrency": tuple(load["concurrency"])}),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
