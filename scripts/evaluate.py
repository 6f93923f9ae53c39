"""Snakemake adapter for rule evaluate: score the fine-tuned model and apply the quality gate."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.evaluate import EvalConfig, evaluate_finetuned
from workflow.tracking import Tracking

evaluate_finetuned(
    snakemake.input.model,
    snakemake.input.test,
    snakemake.input.base,
    snakemake.output.metrics,
    snakemake.output.report,
    EvalConfig(**snakemake.params.settings),
    snakemake.params.gate,
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
