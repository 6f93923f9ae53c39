"""Snakemake adapter for rules benchmark_*: continuous-load benchmark of one engine."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.benchmark import benchmark
from workflow.config import settings
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

benchmark(
    engine_dir=snakemake.input.engine,
    tokenizer_dir=snakemake.input.tokenizer,
    out_path=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    settings=config.engine,
    cfg=config.benchmark,
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
