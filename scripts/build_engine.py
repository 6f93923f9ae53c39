"""Snakemake adapter for rules build_engine_*: build one scheme's engine and measure its accuracy."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.engine.build import build_engine
from workflow.evaluate import EvalConfig
from workflow.tracking import Tracking

build_engine(
    snakemake.input.model,
    snakemake.input.quantized,
    snakemake.output[0],
    snakemake.wildcards.scheme,
    snakemake.params.settings,
    snakemake.input.test,
    snakemake.input.finetuned,
    snakemake.params.max_loss,
    EvalConfig(**snakemake.params.eval_settings),
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
