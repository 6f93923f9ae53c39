"""Snakemake adapter for rules benchmark_*: continuous-load benchmark of one engine."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.benchmark import benchmark
from workflow.config import LoadConfig
from workflow.tracking import Tracking

benchmark(
    engine_dir=snakemake.input.engine,
    tokenizer_dir=snakemake.input.tokenizer,
    out_path=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    settings=snakemake.params.settings,
    cfg=LoadConfig(**snakemake.params.load),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
