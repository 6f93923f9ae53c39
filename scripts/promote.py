"""Snakemake adapter for rule promote: MLflow alias production -> the checked version (previous kept)."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.rollout.stage import promote
from workflow.tracking import Tracking

promote(
    report_path=snakemake.input[0],
    out_path=snakemake.output[0],
    tracking=Tracking.from_config(snakemake.config, snakemake.log[0]),
)
