"""Snakemake adapter for rule evaluate_base: score the base model on the test split."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.evaluate import evaluate_base
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

evaluate_base(
    model_dir=snakemake.input.model,
    test_path=snakemake.input.test,
    out_path=snakemake.output[0],
    cfg=config.evaluate,
    tracking=Tracking.from_config(config, snakemake.log[0]),
    cluster=config.cluster,
)
