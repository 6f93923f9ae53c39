"""Snakemake adapter for checkpoint evaluate_quantized: score one quantized scheme and gate its accuracy loss."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import Cluster, EvalConfig
from workflow.quantize import evaluate_quantized
from workflow.tracking import Tracking

evaluate_quantized(
    model_dir=snakemake.input.model,
    quantized_dir=snakemake.input.quantized,
    test_path=snakemake.input.test,
    finetuned_path=snakemake.input.finetuned,
    out_path=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    max_loss=snakemake.params.max_loss,
    cfg=EvalConfig(**snakemake.params.settings),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
    cluster=Cluster(**snakemake.config["cluster"]),
)
