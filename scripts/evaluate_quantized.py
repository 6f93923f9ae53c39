"""Snakemake adapter for checkpoint evaluate_quantized: score one quantized scheme and gate its accuracy loss and closeness."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.quantize import evaluate_quantized
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

evaluate_quantized(
    model_dir=snakemake.input.model,
    quantized_dir=snakemake.input.quantized,
    test_path=snakemake.input.test,
    finetuned_path=snakemake.input.finetuned,
    out_path=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    gates=config.quantize,
    cfg=config.evaluate,
    tracking=Tracking.from_config(config, snakemake.log[0]),
    cluster=config.cluster,
)
