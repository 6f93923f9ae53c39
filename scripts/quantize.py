"""Snakemake adapter for rule quantize: ModelOpt post-training quantization of one scheme."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import Cluster, QuantizeConfig
from workflow.quantize import quantize
from workflow.tracking import Tracking

quantize(
    model_dir=snakemake.input.model,
    train_path=snakemake.input.train,
    out_dir=snakemake.output[0],
    scheme=snakemake.wildcards.scheme,
    cfg=QuantizeConfig(calib_samples=snakemake.params.calib_samples),
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
    cluster=Cluster(**snakemake.config["cluster"]),
)
