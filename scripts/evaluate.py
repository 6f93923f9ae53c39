"""Snakemake adapter for rule evaluate: score the fine-tuned model and apply the quality gate."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.evaluate import evaluate
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

evaluate(
    model_dir=snakemake.input.model,
    test_path=snakemake.input.test,
    base_path=snakemake.input.base,
    out_path=snakemake.output.metrics,
    report_path=snakemake.output.report,
    cfg=config.evaluate,
    tracking=Tracking.from_config(config, snakemake.log[0]),
    cluster=config.cluster,
)
