"""Snakemake adapter for rule quantize: ModelOpt post-training quantization of one scheme."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.quantize import QuantizeConfig, quantize
from workflow.tracking import Tracking

quantize(
    snakemake.input.model,
    snakemake.input.train,
    snakemake.output[0],
    snakemake.wildcards.scheme,
    QuantizeConfig(calib_samples=snakemake.params.calib_samples),
    Tracking.from_config(snakemake.config, snakemake.log[0]),
)
