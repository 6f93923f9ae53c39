"""Snakemake adapter for rules build_engine_*: build one scheme's engine and measure its accuracy."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import EvalConfig
from workflow.engine.build import build_engine
from workflow.tracking import Tracking

build_engine(
    model_dir=snakemake.input.model,
    quantized_dir=snakemake.input.quantized,
    engine_dir=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    settings=snakemake.params.settings,
    test_path=snakemake.input.test,
    finetuned_path=snakemake.input.finetuned,
    max_loss=snakemake.params.max_loss,
    eval_cfg=EvalConfig(**snakemake.params.eval_settings),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
