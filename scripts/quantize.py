"""Snakemake adapter for rule quantize: ModelOpt post-training quantization of one scheme."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.quantize import quantize
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

quantize(
    model_dir=snakemake.input.model,
    train_path=snakemake.input.train,
    out_dir=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    cfg=config.quantize,
    tracking=Tracking.from_config(config, snakemake.log[0]),
    cluster=config.cluster,
)
