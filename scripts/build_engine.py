"""Snakemake adapter for rules build_engine_*: build one scheme's engine and measure its accuracy and closeness to the fine-tuned model."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.engine.build import build_engine
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

build_engine(
    model_dir=snakemake.input.model,
    quantized_dir=snakemake.input.quantized,
    engine_dir=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    settings=config.engine,
    test_path=snakemake.input.test,
    finetuned_path=snakemake.input.finetuned,
    gates=config.quantize,
    eval_cfg=config.evaluate,
    tracking=Tracking.from_config(config, snakemake.log[0]),
    cluster=config.cluster,
)
