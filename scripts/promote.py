"""Snakemake adapter for rule promote: MLflow alias production -> the checked version (previous kept)."""
from workflow.logs import to_file

to_file(snakemake.log[0])

from workflow.config import settings
from workflow.rollout.stage import promote
from workflow.tracking import Tracking

config = settings(snakemake.config)  # the whole validated config; params only decide what reruns

promote(
    report_path=snakemake.input[0],
    out_path=snakemake.output[0],
    tracking=Tracking.from_config(config, snakemake.log[0]),
)
