"""Snakemake adapter for checkpoint evaluate_quantized: score one quantized scheme and gate its accuracy loss."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.evaluate import EvalConfig
from workflow.quantize import evaluate_quantized
from workflow.tracking import Tracking

evaluate_quantized(
    snakemake.input.model,
    snakemake.input.quantized,
    snakemake.input.test,
    snakemake.input.finetuned,
    snakemake.output[0],
    snakemake.wildcards.scheme,
    snakemake.params.max_loss,
    EvalConfig(**snakemake.params.settings),
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
